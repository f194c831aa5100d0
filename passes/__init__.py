"""pockc's graph passes: each a plain function over a torch.fx.GraphModule returning PassResult."""
from .fx_utils import PassResult
from .insert_optimizer import insert_optimizer
from .prune_backward import prune_backward
from .schedule_updates import schedule_updates

__all__ = ["PassResult", "prune_backward", "insert_optimizer", "schedule_updates"]
