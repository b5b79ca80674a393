"""The engine room: a model of how a vLLM V1 engine spends time on a GPU.

One model, several clocks: `estimate` drives `Engine.step()` on a virtual clock as fast as it can, `emulate` sleeps
each step's duration in real time behind an OpenAI server, `simulate` puts many engines on one event queue.
Depends on `melange_sky.core` only.
"""
from melange_sky.engine.engine import Engine, Step
from melange_sky.engine.errors import DoesNotFit, EngineError
from melange_sky.engine.hardware import GPU_NAMES, GpuSpec, gpu_spec
from melange_sky.engine.models import BUNDLED_MODELS, ModelSpec, load_model
from melange_sky.engine.settings import ENGINE_SETTING_KEYS, EngineSettings
from melange_sky.engine.step_time import CLIENT_ENDPOINT, Coefficients

__all__ = [
    "BUNDLED_MODELS", "CLIENT_ENDPOINT", "Coefficients", "DoesNotFit", "ENGINE_SETTING_KEYS", "Engine", "EngineError",
    "EngineSettings", "GPU_NAMES", "GpuSpec", "ModelSpec", "Step", "gpu_spec", "load_model",
]
