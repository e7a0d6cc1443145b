"""Translation runs over a reference set: batching, per-image seeds, sharding, resume, writing."""

from .config import ILVRSpec, ModelSpec, OutputSpec, SampleConfig, SamplerSpec
from .plan import WorkItem, plan_items, shard_range
from .runner import RunResult, make_net, resolve_device, run
from .seeds import image_generators, image_seed

__all__ = ["ILVRSpec", "ModelSpec", "OutputSpec", "RunResult", "SampleConfig", "SamplerSpec", "WorkItem"]
__all__ += ["image_generators", "image_seed", "make_net", "plan_items", "resolve_device", "run"]
__all__ += ["shard_range"]
