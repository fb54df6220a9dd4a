"""Interest tags inferred on the phone: "likely to convert in ad category c".

A per-category logistic model over the phone's private features, trained with FedAvg
on the phones' own conversion history; the tag is set where the predicted propensity is
at least ``lift`` times the category's population mean.

Features of a phone (float32 [F]): its installed app categories (multi-hot), its
purchase intents (multi-hot over ad categories), log1p of each bag's size, and 1. The
model: :class:`TagModel`. Each impression the phone saw with an observed label is one
example (its ad's category, click and conversion).

What is simplified (stated, not hidden): FedAvg here is a small loop of its own, not the
engine of ``adfed.fl`` (no device profiles, time window, DP or secure aggregation on the
tag model's updates: they would wrap it as they wrap the pCVR model's), every sampled
phone answers, a phone's local training is full-batch gradient descent, and the tag
threshold uses the population mean of the predictions, which a deployment would learn by
secure aggregation of the phones' predictions.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from adfed.data.examples import Examples


@dataclasses.dataclass(frozen=True, kw_only=True)
class TagSettings:
    """FedAvg of the tag model and the tag rule (see the module docstring)."""

    rounds: int = 60
    clients_per_round: int = 500
    local_steps: int = 5
    lr: float = 0.5
    l2: float = 1e-3
    lift: float = 1.5

    def __post_init__(self) -> None:
        for name in ("rounds", "clients_per_round", "local_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"tags.{name} must be an int >= 1; got {getattr(self, name)}")
        if self.lr <= 0 or self.l2 < 0 or self.lift <= 0:
            raise ValueError(f"tags.lr and tags.lift must be > 0 and tags.l2 >= 0; got {self.lr}, "
                             f"{self.lift}, {self.l2}")


@dataclasses.dataclass(frozen=True)
class TagModel:
    """``logit P(click and conversion | phone u, an ad of category c) = b[c] + m[u, c] . a
    + x[u] . v``: a bias per category, weights ``a`` [M] on the phone's match features for
    c (does a private bag of ad categories, such as ``intent``, hold c?) and weights
    ``v`` [F] on its other features, shared by every category (631 conversions in the
    demo world's training history are too few for a full model per category)."""

    b: np.ndarray
    a: np.ndarray
    v: np.ndarray

    def __add__(self, other: TagModel) -> TagModel:
        return TagModel(self.b + other.b, self.a + other.a, self.v + other.v)

    def scale(self, factor: float) -> TagModel:
        return TagModel(self.b * factor, self.a * factor, self.v * factor)

    @staticmethod
    def zeros(num_categories: int, num_match: int, num_features: int) -> TagModel:
        return TagModel(np.zeros(num_categories), np.zeros(num_match), np.zeros(num_features))


@dataclasses.dataclass(frozen=True)
class PhoneFeatures:
    """x float32 [U, F] (multi-hot of each private bag, log1p of its size); match
    float32 [U, C, M] (1 where bag m of phone u holds category c)."""

    x: np.ndarray
    match: np.ndarray


def _multi_hot(bag: tuple[np.ndarray, np.ndarray], width: int) -> np.ndarray:
    values, offsets = bag
    n = len(offsets) - 1
    out = np.zeros((n, width), dtype=np.float32)
    rows = np.repeat(np.arange(n), np.diff(offsets))
    out[rows, values] = 1.0
    return out


def phone_features(users: Examples, bags: dict[str, int], match: tuple[str, ...], num_categories: int) -> PhoneFeatures:
    """Every phone's features: for each bag field ``name -> width`` its multi-hot and
    log1p of its size; for each bag of ``match`` (ids of the category field) its
    membership per category."""
    parts = []
    for name, width in bags.items():
        hot = _multi_hot(users.bags[name], width)
        parts += [hot, np.log1p(hot.sum(axis=1, keepdims=True))]
    hits = [_multi_hot(users.bags[name], num_categories) for name in match]
    m = np.stack(hits, axis=2) if hits else np.zeros((len(users), num_categories, 0), dtype=np.float32)
    return PhoneFeatures(x=np.concatenate(parts, axis=1), match=m)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def local_update(model: TagModel, x: np.ndarray, match: np.ndarray, category: np.ndarray, label: np.ndarray,
                 s: TagSettings) -> TagModel:
    """One phone's FedAvg update (local model minus ``model``) after ``local_steps`` of
    full-batch gradient descent with L2 ``l2`` on its examples (``category`` int [n],
    ``label`` 0/1 [n]); ``x`` [F] and ``match`` [C, M] are the phone's features."""
    cats, inverse = np.unique(category, return_inverse=True)
    pos = np.bincount(inverse, weights=label, minlength=len(cats))
    cnt = np.bincount(inverse, minlength=len(cats)).astype(np.float64)
    n, m = float(len(category)), match[cats].astype(np.float64)
    local = model
    for _ in range(s.local_steps):
        p = _sigmoid(local.b[cats] + m @ local.a + float(x @ local.v))
        r = (p * cnt - pos) / n
        grad_b = np.zeros_like(local.b)
        grad_b[cats] = r
        grad = TagModel(grad_b, r @ m, float(r.sum()) * x)
        local = local + (grad + local.scale(s.l2)).scale(-s.lr)
    return local + model.scale(-1.0)


def train_fedavg(f: PhoneFeatures, phones: list[tuple[int, np.ndarray, np.ndarray]], s: TagSettings,
                 rng: np.random.Generator) -> TagModel:
    """FedAvg of the tag model: each round ``clients_per_round`` phones (of ``phones``:
    (row of the features, categories, labels)) train locally; the server adds the mean of
    their updates weighted by their example counts. Starts at zero weights with every
    bias at the pooled base rate's logit."""
    model = TagModel.zeros(f.match.shape[1], f.match.shape[2], f.x.shape[1])
    labels = np.concatenate([p[2] for p in phones]) if phones else np.zeros(0)
    rate = float(np.clip(labels.mean() if len(labels) else 0.5, 1e-4, 1 - 1e-4))
    model = TagModel(np.full_like(model.b, np.log(rate / (1 - rate))), model.a, model.v)
    if not phones:
        return model
    for _ in range(s.rounds):
        picked = rng.choice(len(phones), size=min(s.clients_per_round, len(phones)), replace=False)
        total, weight = model.scale(0.0), 0.0
        for i in picked:
            row, cat, lab = phones[i]
            total = total + local_update(model, f.x[row], f.match[row], cat, lab, s).scale(len(cat))
            weight += len(cat)
        model = model + total.scale(1.0 / weight)
    return model


def propensity(model: TagModel, f: PhoneFeatures) -> np.ndarray:
    """Each phone's predicted P(click and conversion) per category, float64 [U, C]."""
    return _sigmoid(model.b[None, :] + f.match.astype(np.float64) @ model.a + (f.x.astype(np.float64) @ model.v)[:, None])


def tags_of(prop: np.ndarray, lift: float) -> np.ndarray:
    """bool [U, C]: a phone has tag c when its propensity is at least ``lift`` times the
    population mean of category c's."""
    return prop >= lift * prop.mean(axis=0, keepdims=True)
