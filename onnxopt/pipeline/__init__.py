"""Pass manager, recipes and the context passes share."""

from onnxopt.pipeline.base import OnnxoptPass
from onnxopt.pipeline.context import PassContext
from onnxopt.pipeline.manager import ManagerOptions, PipelineManager, PipelineResult
from onnxopt.pipeline.recipe import PassSpec, Recipe
from onnxopt.pipeline.registry import register

__all__ = ["ManagerOptions", "OnnxoptPass", "PassContext", "PassSpec", "PipelineManager", "PipelineResult",
           "Recipe", "register"]
