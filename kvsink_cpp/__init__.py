"""kvsink_cpp: a llama.cpp-style runtime for GGUF models with a KV cache that
keeps the model's attention-sink tokens exact."""
from .errors import (CancelledError, ContextFullError, GGUFFormatError, InvalidArgumentError, KvsinkError, KvsinkIOError,
                     KvsinkWarning, UnsupportedError)
from .gguf_file import GGUFFile
from .llama import Llama, cuda_available, cuda_status
from .models import default_model_path, pull_default_model
from .session import LlamaRAMCache, LlamaState, SessionError
from .structured import LlamaGrammar

__version__ = "0.1.0"

__all__ = [
    "Llama", "GGUFFile", "KvsinkError", "GGUFFormatError", "UnsupportedError", "ContextFullError",
    "InvalidArgumentError", "KvsinkIOError", "KvsinkWarning", "CancelledError", "pull_default_model", "default_model_path",
    "LlamaState", "LlamaRAMCache", "SessionError", "LlamaGrammar", "cuda_available", "cuda_status",
]
