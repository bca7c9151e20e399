"""Timing scripts (``python -m benchmarks.NAME``).

They run with the host allocator setting of the ``main`` and ``restore`` commands
(``artfr_jax/utils/host_memory.py``; ``ARTFR_JAX_HOST_MALLOC=system`` for glibc's defaults), and
without the persistent compilation cache, so that the compile times they print are real.
"""

from artfr_jax.utils import compile_cache as _compile_cache
from artfr_jax.utils import host_memory as _host_memory

_host_memory.retain_freed_memory_on_cpu()
_compile_cache.disable_persistent_cache()
