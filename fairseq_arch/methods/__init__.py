"""The regularisation methods of ``--adv-method``, one module each, behind a registry.

A method declares what the rest of the code asks about it (:class:`~.base.Method`:
does it run an ascent, is its teacher detached, does it need ARCH's cache, its
forward/backward counts, its default init and KL) and implements one training step
(:meth:`~.base.Method.step`; r3f, smart and arch share the KL step of
``kl_regularised.py`` and say only where delta comes from).
Adding a method is one new module here, registered with :func:`register_method`, plus
its tests; the criterion's ``--adv-method`` choices come from :func:`method_names`.

    none    CE only                                          1 forward,  1 backward
    r3f     CE + lambda KL(f(x) || f(x + noise))               2, 1
    smart   CE + lambda KL(f(x) || f(x + delta)), S-step ascent S+2, S+1
    freelb  mean of the CE at S+1 ascent points                S+1, S+1
    arch    smart on refresh epochs, the cache otherwise       S+2, S+1 / 2, 1
    rdrop   R-Drop: two dropout passes, symmetric KL           2, 1
    zero-delta  the KL step with delta = 0 (dropout consistency)  2, 1
    arch-rdrop  R-Drop with ARCH's delta on the second pass   S+2, S+1 / 2, 1

(every model call is a forward; every gradient computation is a backward: each
``torch.autograd.grad`` of an ascent step plus the trainer's ``loss.backward()``).
"""

from typing import Dict, Tuple, Type

from .base import Method

METHOD_REGISTRY: Dict[str, Type[Method]] = {}


def register_method(name: str):
    def register(cls):
        if name in METHOD_REGISTRY and METHOD_REGISTRY[name] is not cls:
            raise ValueError(f"--adv-method {name} is registered twice")
        cls.name = name
        METHOD_REGISTRY[name] = cls
        return cls

    return register


def method_names() -> Tuple[str, ...]:
    return tuple(METHOD_REGISTRY)


def method_class(name: str) -> Type[Method]:
    if name not in METHOD_REGISTRY:
        raise ValueError(f"--adv-method must be one of {method_names()}, got {name!r}")
    return METHOD_REGISTRY[name]


# registered in the order of --adv-method's choices
from . import none, r3f, smart, freelb, arch, rdrop, zero_delta, arch_rdrop  # noqa: E402,F401
