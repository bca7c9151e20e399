"""artfr_jax: blind face restoration (ART-FR, VQFR, OSDFace) in JAX/Flax.

Importing the package keeps freed host memory in the process (``utils/host_memory.py``), which
must happen before JAX's first computation; ``ARTFR_JAX_HOST_MALLOC=system`` turns that off.
"""

from artfr_jax.utils import host_memory as _host_memory

_host_memory.retain_freed_memory()
