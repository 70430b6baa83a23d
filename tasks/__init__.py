import logging as _logging

# bitsandbytes, imported by diffusers, warns on every import (CPUs with AVX512-BF16) that the Hub kernel of an
# optional 4-bit CPU op is untrusted; this project never builds 4-bit layers, so the line is noise in every log.
_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "kernels-community" not in r.getMessage())
