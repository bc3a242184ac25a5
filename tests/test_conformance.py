"""Every registered attack and interpreter, built from its declarations alone (timm's test_models.py style).

No test here names a concrete attack or interpreter: what it may pass, what it needs and what it saves
come from the class (``hyperparams``, ``takes_interpreter``, ``artifacts``; ``needs_surrogate``,
``requires_checkpoint``, ``encode``). A new attack or interpreter is covered as soon as it is registered.
"""

from __future__ import annotations

import inspect

import pytest
import torch

import juap
from helpers import texture_classifier
from juap import ATTACKS, INTERPRETERS
from juap._validate import REQUIRED, Param
from juap.app.artifacts import load_perturbation, save_perturbation
from juap.attacks.base import COMMON_ARGS
from juap.budget import perturbation_norm
from juap.interpreters import make_surrogate, normalize_maps
from juap.runtime.io import load_tensors, save_tensors

SIZE = 32  # generators need multiples of 32
# The smallest honest run of each kind of loop, applied to whichever of these an attack declares.
TINY = {
    "steps": 2,
    "batch_size": 8,
    "eval_every": 1,
    "epochs": 1,
    "max_passes": 1,
    "deepfool_steps": 3,
    "nb_grads": 3,
    "generator_options": {"ngf": 4, "n_blocks": 1},
}
BUDGETS = {"linf": 24.0, "l2": 600.0}


@pytest.fixture(scope="module")
def tiny():
    """A tiny classifier well above chance on 3 texture classes, and 16 of its held-out images."""
    clf, x, _ = texture_classifier()
    return clf, x[:16]


@pytest.fixture(scope="module")
def learned(tmp_path_factory, tiny):
    """For every interpreter that requires a checkpoint: a file it was saved to (untrained, but real)."""
    clf, _ = tiny
    folder = tmp_path_factory.mktemp("learned")
    paths = {}
    for name in juap.list_interpreters():
        if INTERPRETERS.get(name).requires_checkpoint:
            torch.manual_seed(0)
            paths[name] = INTERPRETERS.get(name).create(clf).save(folder / f"{name}.safetensors")
    return paths


def make_interpreter(name, clf, learned):
    cls = INTERPRETERS.get(name)
    return cls.create(clf, checkpoint=learned[name]) if cls.requires_checkpoint else cls.create(clf)


def tiny_params(cls) -> dict:
    """Declared hyperparameters set for a run of seconds; a required one gets its smallest valid value."""
    params = {k: v for k, v in TINY.items() if k in cls.hyperparams}
    for key, p in cls.hyperparams.items():
        if p.required:
            params[key] = int(p.low or 0)
    return params


def build(name, clf, interpreter=None, norm="linf"):
    cls = ATTACKS.get(name)
    extra = {"interpreter": interpreter} if cls.takes_interpreter else {}
    return juap.create_attack(name, classifier=clf, norm=norm, eps=BUDGETS[norm], **tiny_params(cls), **extra)


def attack_cases():
    """(attack, interpreter) pairs: each attack that takes an interpreter with every interpreter."""
    for a in juap.list_attacks():
        if ATTACKS.get(a).takes_interpreter:
            yield from ((a, i) for i in juap.list_interpreters())
        else:
            yield a, None


CASES = list(attack_cases())


# -- interpreters ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", juap.list_interpreters())
def test_interpreter_maps_have_the_shape_and_range_of_the_contract(name, tiny, learned):
    clf, x = tiny
    interp = make_interpreter(name, clf, learned)
    logits, maps = interp.explain(x)
    assert logits.shape == (len(x), clf.num_classes)
    assert maps.dim() == 3 and len(maps) == len(x) and torch.isfinite(maps).all()
    norm = normalize_maps(maps)
    assert norm.min() >= 0 and norm.max() <= 1 and (norm.flatten(1).amax(1) > 0.99).all()
    classes = logits.argmax(1)
    torch.testing.assert_close(interp(x, classes), maps)  # forward == explain's maps of the prediction
    other = (classes + 1) % clf.num_classes
    assert not torch.equal(interp(x, other), maps)  # the class matters
    with torch.no_grad():
        assert interp.explain(x)[1].grad_fn is None


@pytest.mark.parametrize("name", juap.list_interpreters())
def test_gradients_flow_through_the_interpreter(name, tiny, learned):
    """A loss on the normalised maps reaches the images (through the surrogate where it is declared)."""
    clf, x = tiny
    judge = make_interpreter(name, clf, learned)
    interp = judge
    if judge.needs_surrogate:
        interp = make_interpreter(name, make_surrogate(clf), learned)
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(normalize_maps(interp(xg, judge.explain(x)[0].argmax(1))).sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", juap.list_interpreters())
def test_interpreter_declarations_hold(name, tiny, learned, tmp_path):
    clf, x = tiny
    cls = INTERPRETERS.get(name)
    assert cls.name == name and cls.label
    with pytest.raises(juap.ConfigError, match="unknown option"):
        cls.create(clf, no_such_option=1)
    interp = make_interpreter(name, clf, learned)
    feats = interp.encode(x)
    assert feats is None or (feats.dim() == 4 and len(feats) == len(x) and torch.isfinite(feats).all())
    if cls.requires_checkpoint:
        assert interp.checkpoint is not None and cls.create(clf).checkpoint is None
        # save/load round trip: the same maps from the reloaded file
        again = cls.create(clf, checkpoint=interp.save(tmp_path / "again.safetensors"))
        torch.testing.assert_close(again(x), interp(x))
    else:
        with pytest.raises(NotImplementedError):
            interp.save(tmp_path / "nothing.safetensors")


# -- attacks: declarations -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", juap.list_attacks())
def test_declared_hyperparams_are_the_constructor_arguments(name):
    """Each declared name is accepted with the declared default; the class's own arguments are declared."""
    cls = ATTACKS.get(name)
    assert cls.name == name and cls.label and set(cls.artifacts) <= {"perturbation", "generator"}
    assert bool(cls.artifacts) == cls.universal  # a universal attack saves at least its perturbation
    signature = {}
    for klass in reversed(cls.__mro__):  # the most derived constructor's default wins
        init = klass.__dict__.get("__init__")
        if init is not None:
            for p in inspect.signature(init).parameters.values():
                if p.kind == p.KEYWORD_ONLY:
                    signature[p.name] = p.default
    own = [
        p.name
        for p in inspect.signature(cls.__init__).parameters.values()
        if p.kind == p.KEYWORD_ONLY and p.name not in COMMON_ARGS
    ]
    assert set(own) <= set(cls.hyperparams)
    for old, new in cls.renamed.items():  # an old name is declared as its new name is, without a default
        assert new in signature and old not in signature and cls.hyperparams[old].default is None
    for key, p in cls.hyperparams.items():
        if key in cls.renamed:
            continue
        assert key in signature, f"{name} declares {key!r} but no constructor takes it"
        expected = REQUIRED if signature[key] is inspect.Parameter.empty else signature[key]
        assert p.default == expected, (
            f"{name}.{key}: declared default {p.default!r}, constructor {expected!r}"
        )
    cls.check_hyperparams({**cls.defaults(), **tiny_params(cls)})


def test_every_attack_defaults_to_the_papers_budget():
    """The norm and budget defaults agree across attacks: the paper's per-pixel L_inf 10."""
    for name in juap.list_attacks():
        defaults = {}
        for klass in reversed(ATTACKS.get(name).__mro__):  # the most derived constructor's default wins
            init = klass.__dict__.get("__init__")
            if init is not None:
                params = inspect.signature(init).parameters
                defaults.update({k: params[k].default for k in ("norm", "eps") if k in params})
        assert defaults == {"norm": "linf", "eps": 10.0}, name


def _bad_value(p: Param):
    """A value the declaration must refuse (or None when every value of its type is allowed)."""
    if p.choices:
        return "no-such-choice" if not any(isinstance(c, bool) for c in p.choices) else 3.5
    if p.low is not None:
        return p.low if p.low_open else p.low - 1
    types = p.types if isinstance(p.types, tuple) else (p.types,)
    return "a string" if str not in types else 7


@pytest.mark.parametrize("name", juap.list_attacks())
def test_bad_hyperparameters_are_config_errors(name, tiny):
    clf, _ = tiny
    cls = ATTACKS.get(name)
    for key, p in cls.hyperparams.items():
        bad = _bad_value(p)
        with pytest.raises(juap.ConfigError, match=key):
            cls.check_hyperparams({**tiny_params(cls), key: bad})
        if p.types is int or p.types is float:
            with pytest.raises(juap.ConfigError, match=key):  # True is an int to Python, never to us
                cls.check_hyperparams({**tiny_params(cls), key: True})
    with pytest.raises(juap.ConfigError, match="Did you mean"):
        cls.check_hyperparams({**tiny_params(cls), next(iter(cls.hyperparams)) + "s": 1})
    with pytest.raises(juap.ConfigError, match="no_such_parameter"):
        juap.create_attack(name, classifier=clf, no_such_parameter=1)
    int_params = [k for k, p in cls.hyperparams.items() if p.types is int and p.low is not None]
    if int_params:  # the library entry point refuses it too, before the constructor runs
        key = int_params[0]
        with pytest.raises(juap.ConfigError, match=key):
            juap.create_attack(
                name, classifier=clf, **{**tiny_params(cls), key: _bad_value(cls.hyperparams[key])}
            )


def test_an_attack_without_an_interpreter_refuses_one(tiny):
    clf, _ = tiny
    cam = juap.create_interpreter(juap.list_interpreters()[0], clf)
    for name in juap.list_attacks():
        cls = ATTACKS.get(name)
        if not cls.takes_interpreter:
            with pytest.raises((juap.ConfigError, TypeError)):
                juap.create_attack(name, classifier=clf, interpreter=cam, **tiny_params(cls))


@pytest.mark.parametrize("name", juap.list_attacks())
def test_an_undeclared_hyperparameter_is_refused_not_dropped(name, tiny):
    """A hyperparameter another attack declares (GUAP has no ``lam``, GUAP-C_t no ``objective``) is an
    error for the constructor itself, not silently ignored."""
    clf, _ = tiny
    cls = ATTACKS.get(name)
    others = {}
    for other in juap.list_attacks():
        for key, p in ATTACKS.get(other).hyperparams.items():
            meaningful = not p.required and p.default not in (None, 0, 0.0, False)
            if key not in cls.hyperparams and key not in COMMON_ARGS and meaningful:
                others.setdefault(key, p.default)
    plain = next(i for i in juap.list_interpreters() if not INTERPRETERS.get(i).requires_checkpoint)
    extra = {"interpreter": juap.create_interpreter(plain, clf)} if cls.takes_interpreter else {}
    for key, value in others.items():
        with pytest.raises((juap.ConfigError, TypeError), match=key):
            cls(classifier=clf, **tiny_params(cls), **extra, **{key: value})


def test_an_untrained_learned_interpreter_is_refused_the_same_way_by_every_attack(tiny):
    """Every attack that takes an interpreter (universal or per image) refuses a learned one without its
    trained file, with one message: its maps would mean nothing."""
    clf, _ = tiny
    takers = [n for n in juap.list_attacks() if ATTACKS.get(n).takes_interpreter]
    learned = [n for n in juap.list_interpreters() if INTERPRETERS.get(n).requires_checkpoint]
    assert takers and learned
    for iname in learned:
        untrained = INTERPRETERS.get(iname).create(clf)
        messages = set()
        for name in takers:
            with pytest.raises(juap.ConfigError, match="untrained") as refused:
                build(name, clf, untrained)
            messages.add(str(refused.value))
        assert len(messages) == 1, messages


@pytest.mark.parametrize("name", [n for n in juap.list_attacks() if ATTACKS.get(n).renamed])
def test_an_old_hyperparameter_name_still_works_with_a_warning(name, tiny):
    """A renamed hyperparameter's old name passes the checks and reaches the constructor as the new name,
    with a FutureWarning that names both; giving both is an error."""
    import warnings

    clf, _ = tiny
    cls = ATTACKS.get(name)
    plain = next(i for i in juap.list_interpreters() if not INTERPRETERS.get(i).requires_checkpoint)
    extra = {"interpreter": juap.create_interpreter(plain, clf)} if cls.takes_interpreter else {}
    for old, new in cls.renamed.items():
        value = cls.hyperparams[new].default
        cls.check_hyperparams({**tiny_params(cls), old: value})
        with pytest.warns(FutureWarning, match=f"{old}.*{new}"):
            juap.create_attack(name, classifier=clf, **tiny_params(cls), **extra, **{old: value})
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            juap.create_attack(name, classifier=clf, **tiny_params(cls), **extra, **{new: value})
        with pytest.raises(juap.ConfigError, match="not both"):
            juap.create_attack(name, classifier=clf, **tiny_params(cls), **extra, **{old: value, new: value})


@pytest.mark.parametrize("name", juap.list_attacks())
def test_dry_run_sizes_are_declared_and_valid(name):
    """A dry run shrinks what the attack declares (``Param(dry_run=...)``), to values its checks accept,
    overriding what a config gives; a universal attack declares at least its loop length."""
    cls = ATTACKS.get(name)
    shrunk = {k for k, p in cls.hyperparams.items() if p.dry_run is not None}
    assert shrunk, f"{name} declares no dry-run size: a dry run would train it in full"
    given = tiny_params(cls)
    params = cls.dry_run_params(given)
    cls.check_hyperparams(params)
    for key in shrunk:
        p = cls.hyperparams[key]
        if isinstance(p.dry_run, dict):
            kept = {k: v for k, v in (given.get(key) or p.default or {}).items() if k not in p.dry_run}
            assert params[key] == {**kept, **p.dry_run}  # merged: the other options are kept
        else:
            assert params[key] == p.dry_run


# -- attacks: running ------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,interp", CASES, ids=[f"{a}-{i}" if i else a for a, i in CASES])
def test_attack_holds_its_budget(name, interp, tiny, learned, tmp_path):
    clf, x = tiny
    interpreter = make_interpreter(interp, clf, learned) if interp else None
    norm = "l2" if interp == juap.list_interpreters()[-1] else "linf"  # both norms, over the cases
    attack = build(name, clf, interpreter, norm=norm)
    eps = BUDGETS[norm]
    if attack.universal:
        n_hat = attack.fit(x, progress=False)
        assert n_hat.shape == (3, SIZE, SIZE) and torch.isfinite(n_hat).all()
        assert float(perturbation_norm(n_hat.double(), norm)) <= eps * (1 + 1e-4) + 1e-3
        x_adv = attack.perturb(x)
        _round_trip_artifacts(attack, n_hat, tmp_path)
    else:
        x_adv = attack(x)
        sizes = perturbation_norm((x_adv - x).double(), norm)
        assert (sizes <= eps * (1 + 1e-4) + 1e-3).all()
    assert x_adv.shape == x.shape and x_adv.min() >= 0 and x_adv.max() <= 1


def _round_trip_artifacts(attack, n_hat, tmp_path):
    """Save and reload what the attack declares; the reloaded artifact gives the same perturbation."""
    if "perturbation" in attack.artifacts:
        save_perturbation(
            tmp_path / "perturbation", n_hat, attack=attack.name, norm=attack.norm, eps=attack.eps
        )
        torch.testing.assert_close(load_perturbation(tmp_path / "perturbation.safetensors"), n_hat.cpu())
    if "generator" in attack.artifacts:
        save_tensors(tmp_path / "generator.safetensors", attack.generator.state_dict(), {"format": "test"})
        state, _ = load_tensors(tmp_path / "generator.safetensors")
        fresh = juap.create_generator(attack.generator_spec, **attack.generator_options)
        fresh.load_state_dict(state)
        torch.testing.assert_close(attack.current_perturbation(fresh.eval()), n_hat)
