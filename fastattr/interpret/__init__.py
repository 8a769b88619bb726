"""The interpreters: PyHealth's classes as drop-ins, grouped by family (``gradient/``, ``attention/``,
``perturbation/``, and the random baseline), over the feature protocol, length groups and padding checks
they share (the modules here).

The methods' modules moved into their families (issue #32); each old path (``fastattr.interpret.ig``,
``fastattr.interpret.chefer``, ...) still imports, with a ``DeprecationWarning`` naming the new one."""
from fastattr.moved import moved_attribute, register

#: old module path -> the module that replaces it
MOVED = {f"fastattr.interpret.{old}": f"fastattr.interpret.{new}" for old, new in {
    "ig": "gradient.ig", "ig_adaptive": "gradient.ig_adaptive", "convergence": "gradient.convergence",
    "ig_gim": "gradient.ig_gim", "gim": "gradient.gim", "gim_rules": "gradient.gim_rules",
    "deeplift": "gradient.deeplift", "deeplift_rules": "gradient.deeplift_rules",
    "chefer": "attention.chefer", "capture": "attention.capture", "row_picks": "attention.row_picks",
    "rollout": "attention.rollout",
    "perturbation_inputs": "perturbation.inputs", "shap": "perturbation.shap", "shapley": "perturbation.shapley",
    "lime": "perturbation.lime",
}.items()}
register(MOVED)


def __getattr__(name: str) -> object:
    """``fastattr.interpret.X`` as an attribute for an old module path ``X``."""
    return moved_attribute(__name__, name)
