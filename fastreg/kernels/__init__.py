"""Triton kernels, registered as ``fastreg_triton::<op>`` for CPU (``TRITON_INTERPRET=1``) and CUDA.

Each module here holds one op family's kernels, host launcher and registration; importing this
package imports them all. ``TRITON_INTERPRET=1`` must be set before this package is imported
for the CPU path."""
import importlib
import pkgutil

for _m in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_m.name}")
