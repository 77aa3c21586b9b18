"""miaotui (秒推): load, compress, run and measure large language models.

The public Python entry points live here; everything else is an implementation module.
"""

from miaotui.api import LLM
from miaotui.engine.sampling_params import SamplingParams
from miaotui.errors import MiaotuiError

__version__ = "0.1.0"
__all__ = ["LLM", "SamplingParams", "MiaotuiError", "__version__"]
