"""Loading models: local directories and the Hub through ``from_pretrained``, GGUF files, the zoo.

The public names of its modules resolve from the package too, on first use (so importing one module of the
package does not import the rest): ``from ryzen_opt.models import parse_dtype``.
"""

from ryzen_opt import lazy_exports

_EXPORTS = {
    "parse_dtype": "ryzen_opt.models.loading",
    "looks_like_path": "ryzen_opt.models.loading",
    "hub_reachable": "ryzen_opt.models.loading",
    "load_model": "ryzen_opt.models.loading",
    "find_gguf": "ryzen_opt.models.loading",
    "load_gguf": "ryzen_opt.models.loading",
}
__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
