"""DEQ model families (IGNN, MDEQ, DEQ transformer) and explicit baselines of matched size."""
from cdeq.models.protocol import DEQModel

__all__ = ["DEQModel"]
