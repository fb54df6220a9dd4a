"""How close can anything trained on these rows get to the oracle? (issue 3's target)

The oracle scores the test rows with the truth ``p_cvr``: it knows every coefficient of
the world, including each ad's own conversion effect (``TruthTables.ad``) and each
user's latent residual. On a synthetic dataset this experiment regenerates every
impression's conversion logit term by term (:func:`data_gen.impressions.impression_parts`)
and scores the test rows of ``adfed train`` (each user's last impressions; clicked, label
observed) with:

- ``oracle``: the whole truth logit;
- ``oracle_without_residual``: the truth minus the user residual, which no field
  explains (only on-device personalization can recover it);
- ``fields_known_ads_learned``: a logistic regression that is *given* the exact field
  part of the logit (cloud and private fields, context: everything but the ad's own
  term and the residual) as one input and learns one effect per ad and per advertiser
  from the training rows' conversions (L2 strength chosen by 5-fold cross-validation on
  training rows only). Every real model must learn the field part as well, so this
  is an optimistic bound for any model trained on the same rows;
- ``crosses_learned``: a logistic regression that learns *every* coefficient from the
  same conversions, over the dataset's own columns in the truth's functional form:
  one-hots of each field (ad, advertiser, creative, region, hour, slot, network), the
  (age, gender, ad category) and (os, ad category) cells, and each user bag crossed with
  the ad category (installed app categories, the categories of the recent app usage as a
  histogram, intents), plus the number of intents. It is handed only the form and the
  app -> app category map; what it cannot represent is each ad's own deviation from its
  category in the interest term. A well-specified learner that uses conversions only
  (the model also learns from clicks);
- ``crosses_learned_with_clicks``: the same design, in two stages that use the clicks
  as the model does: a click regression over every training impression (L2 by 3-fold
  cross-validation), then the conversion regression above with that click logit as one
  more input (the truth's click and conversion logits share their form and part of their
  coefficients);
- ``centralized``: the centralized model of the base config (``adfed train --mode
  centralized``), trained here.

All six are scored on the same rows, with paired bootstrap intervals of each AUC and
of its gap to the oracle (:func:`adfed.metrics.paired_bootstrap_auc`): the test set of a
small world holds few conversions, so the noise of a single AUC is reported beside it.
``auc_expected`` gives each one's AUC in expectation over the truth's labels on every
test impression of a label-observed user (:func:`adfed.metrics.expected_auc`), the
low-noise version of the same comparison.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from sklearn.linear_model import LogisticRegressionCV
from threadpoolctl import threadpool_limits

from adfed.config import Config
from adfed.data.examples import Examples
from adfed.data.schema import USER_KEY, Schema
from adfed.data.store import TRUTH_PREFIX, Dataset, split_by_time
from adfed.errors import DataError
from adfed.metrics import expected_auc, paired_bootstrap_auc
from adfed.model.pcvr import PCVRModel
from adfed.model.predict import predict
from adfed.rundir import save_figure
from data_gen.generate import world_from_manifest
from data_gen.impressions import ImpressionParts, impression_parts
from data_gen.truth import sigmoid
from data_gen.world import World

#: Users regenerated per chunk (memory grows with it, not with the population).
CHUNK_USERS = 4096
#: Inverse L2 strengths the cross-validation chooses from.
GLM_CS = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
#: The same for the click regression (300k rows: fewer candidates, 3 folds).
CLICK_CS = (0.01, 0.03, 0.1)
BOOTSTRAP_RESAMPLES = 1000


def world_of(dataset: Dataset, experiment: str = "ceiling") -> World:
    """The data_gen world that wrote ``dataset``; DataError (naming ``experiment``) for any
    other dataset."""
    manifest = json.loads((dataset.path / "manifest.json").read_text())
    world = world_from_manifest(manifest, str(dataset.path / "manifest.json"))
    if world is None:
        raise DataError(
            f"experiment {experiment} needs a synthetic dataset written by `adfed data generate`; "
            f"{dataset.path} was written by {manifest.get('generator')!r}"
        )
    return world


def regenerate(world: World, num_users: int) -> ImpressionParts:
    """:func:`impression_parts` of every user, chunk by chunk, in file order."""
    chunks = [impression_parts(world, np.arange(s, min(s + CHUNK_USERS, num_users)))
              for s in range(0, num_users, CHUNK_USERS)]
    return ImpressionParts(**{f.name: np.concatenate([getattr(c, f.name) for c in chunks])
                              for f in dataclasses.fields(ImpressionParts)})


def _check_aligned(parts: ImpressionParts, user_id: np.ndarray, p_cvr: np.ndarray, path: Path) -> None:
    ok = len(parts.user_id) == len(user_id) and np.array_equal(parts.user_id, user_id)
    if ok:
        ok = bool(np.allclose(sigmoid(parts.cvr_logit), p_cvr, rtol=0.0, atol=1e-6))
    if not ok:
        raise DataError(f"{path}: regenerating the truth from its manifest does not reproduce "
                        f"truth/ (written by another generator version?); regenerate the dataset")


def _ad_design(known: np.ndarray, ads: np.ndarray, advertisers: np.ndarray,
               num_ads: int, num_advertisers: int) -> sp.csr_matrix:
    """[n, 1 + ads + advertisers]: the known field logit, then one-hots of ad and advertiser."""
    n = len(known)
    rows = np.arange(n)
    one_hot = lambda cols, width: sp.csr_matrix((np.ones(n), (rows, cols)), shape=(n, width))  # noqa: E731
    return sp.hstack([sp.csr_matrix(known[:, None]), one_hot(ads, num_ads),
                      one_hot(advertisers, num_advertisers)]).tocsr()


def _fit_glm(cs: tuple[float, ...], folds: int, seed: int, x: sp.csr_matrix, y: np.ndarray) -> LogisticRegressionCV:
    """An L2 logistic regression fitted on ``(x, y)``, its strength chosen from ``cs`` by
    ``folds``-fold cross-validated log loss, fitted under one BLAS thread."""
    glm = LogisticRegressionCV(Cs=list(cs), cv=folds, scoring="neg_log_loss", max_iter=2000,
                               random_state=seed, l1_ratios=(0.0,), use_legacy_attributes=False)
    with threadpool_limits(1):
        glm.fit(x, y)
    return glm


def fields_known_ads_learned(known: np.ndarray, ads: np.ndarray, advertisers: np.ndarray,
                             y: np.ndarray, train: np.ndarray, test: np.ndarray,
                             num_ads: int, num_advertisers: int, seed: int) -> tuple[np.ndarray, float]:
    """Scores of ``test`` rows by the GLM of the module docstring, and its chosen C."""
    def design(r: np.ndarray) -> sp.csr_matrix:
        return _ad_design(known[r], ads[r], advertisers[r], num_ads, num_advertisers)

    glm = _fit_glm(GLM_CS, 5, seed, design(train), y[train])
    return glm.decision_function(design(test)), float(glm.C_)


def crosses_design(examples: Examples, schema: Schema, app_category: np.ndarray,
                   num_app_categories: int) -> sp.csr_matrix:
    """[n, columns]: the ``crosses_learned`` inputs of ``examples`` (module docstring).

    One block per term of the truth's conversion logit, each a sparse one-hot (or counts)
    over the dataset's own vocabularies; ``app_category`` maps an ``app_usage`` id to its
    app category. Every column is in {0, 1} except the usage histogram (fractions of the
    sequence) and the intent count.
    """
    ids, n = examples.ids, len(examples)
    vocab = {f.name: f.vocab_size for f in schema.fields}
    cat, num_cats = ids["ad_category"], vocab["ad_category"]
    blocks: list[sp.csr_matrix] = []

    def one_hot(cols: np.ndarray, width: int, rows: np.ndarray | None = None,
                values: np.ndarray | None = None) -> None:
        r = np.arange(n) if rows is None else rows
        v = np.ones(len(cols)) if values is None else values
        blocks.append(sp.csr_matrix((v, (r, cols)), shape=(n, width)))

    for name in ("ad_id", "advertiser_id", "creative_type", "region", "hour", "slot", "network"):
        one_hot(ids[name], vocab[name])
    demo = (ids["age_bucket"] * vocab["gender"] + ids["gender"]) * num_cats + cat
    one_hot(demo, vocab["age_bucket"] * vocab["gender"] * num_cats)
    one_hot(ids["os"] * num_cats + cat, vocab["os"] * num_cats)

    def crossed(name: str, width: int, to_col: Any = None, histogram: bool = False) -> None:
        values, offsets = examples.bags[name]
        lengths = np.diff(offsets)
        rows = np.repeat(np.arange(n), lengths)
        col = values if to_col is None else to_col(values)
        weight = 1.0 / lengths[rows] if histogram else np.ones(len(rows))
        one_hot(col * num_cats + cat[rows], width * num_cats, rows, weight)

    crossed("installed_apps", num_app_categories)
    crossed("app_usage", num_app_categories, lambda v: app_category[v], histogram=True)
    crossed("intent", num_cats)
    intents = np.diff(examples.bags["intent"][1]).astype(np.float64)
    blocks.append(sp.csr_matrix(((intents - intents.mean()) / max(intents.std(), 1e-9))[:, None]))
    return sp.hstack(blocks).tocsr()


def crosses_learned(design: sp.csr_matrix, y: np.ndarray, train: np.ndarray, test: np.ndarray,
                    seed: int) -> tuple[np.ndarray, float]:
    """Scores of ``test`` rows by the ``crosses_learned`` GLM, and its chosen C."""
    glm = _fit_glm(GLM_CS, 5, seed, design[train], y[train])
    return glm.decision_function(design[test]), float(glm.C_)


def click_logit(design: sp.csr_matrix, click: np.ndarray, train: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
    """Every row's logit under the click regression of ``crosses_learned_with_clicks``,
    fitted on ``train`` rows, and its chosen C."""
    glm = _fit_glm(CLICK_CS, 3, seed, design[train], click[train])
    return glm.decision_function(design), float(glm.C_)


def analyse(base: Config, dataset: Dataset, model: PCVRModel, progress: Any) -> dict[str, Any]:
    """The experiment's results for a trained centralized ``model`` (module docstring)."""
    world = world_of(dataset)
    progress(f"regenerating the truth of {len(dataset.user_ids):,} users")
    parts = regenerate(world, world.params.num_users)
    examples = dataset.load()
    labels = examples.labels
    _check_aligned(parts, examples.ids[USER_KEY], labels[TRUTH_PREFIX + "p_cvr"], dataset.path)
    train_rows, test_rows = split_by_time(parts.user_id, base.data.test_fraction)
    labelled = (labels["click"] == 1) & labels["label_observed"].astype(bool)
    train, test = train_rows[labelled[train_rows]], test_rows[labelled[test_rows]]
    y = labels["conversion"].astype(np.int64)

    # every test impression of a label-observed user, for the expected AUCs
    observed = test_rows[labels["label_observed"].astype(bool)[test_rows]]
    in_test = np.isin(observed, test)

    progress("fitting the fields-known, ads-learned regression")
    known = parts.cvr_logit - parts.cvr_ad - parts.cvr_residual
    glm_scores, glm_c = fields_known_ads_learned(
        known, parts.ad_id, world.ad_advertiser[parts.ad_id].astype(np.int64), y, train, observed,
        world.params.num_ads, world.params.num_advertisers, base.seed)
    progress("fitting the crosses-learned regression")
    crosses = crosses_design(examples, dataset.schema, world.app_category, world.params.num_app_categories)
    cross_scores, cross_c = crosses_learned(crosses, y, train, observed, base.seed)
    progress("fitting the click regression")
    clicks, click_c = click_logit(crosses, labels["click"].astype(np.int64), train_rows, base.seed)
    with_clicks = sp.hstack([crosses, sp.csr_matrix(clicks[:, None])]).tocsr()
    click_scores, two_stage_c = crosses_learned(with_clicks, y, train, observed, base.seed)
    _, pcvr = predict(model, examples.take(observed))
    every = {
        "oracle": parts.cvr_logit[observed],
        "oracle_without_residual": (parts.cvr_logit - parts.cvr_residual)[observed],
        "fields_known_ads_learned": glm_scores,
        "crosses_learned": cross_scores,
        "crosses_learned_with_clicks": click_scores,
        "centralized": pcvr.astype(np.float64),
    }
    p_click = labels[TRUTH_PREFIX + "p_click"][observed].astype(np.float64)
    p_cvr = labels[TRUTH_PREFIX + "p_cvr"][observed].astype(np.float64)
    expected = {k: expected_auc(v, p_click * p_cvr, p_click * (1.0 - p_cvr)) for k, v in every.items()}
    scores = {k: v[in_test] for k, v in every.items()}
    progress("bootstrapping the AUCs")
    return {
        "auc_expected": expected,
        "test_rows": int(len(test)),
        "test_conversions": int(y[test].sum()),
        "train_rows": int(len(train)),
        "train_conversions": int(y[train].sum()),
        "glm_c": glm_c,
        "crosses_c": cross_c,
        "click_c": click_c,
        "crosses_with_clicks_c": two_stage_c,
        "bootstrap": {"resamples": BOOTSTRAP_RESAMPLES, "level": 0.95, "paired": True},
        "auc": paired_bootstrap_auc(y[test], scores, "oracle", resamples=BOOTSTRAP_RESAMPLES,
                                    seed=base.seed),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Each score's AUC with its bootstrap interval (bars) and its expected AUC (diamonds),
    as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = results["auc"]
    names = list(table)
    auc = np.array([table[k]["auc"] for k in names])
    err = np.array([[table[k]["auc"] - table[k]["low"] for k in names],
                    [table[k]["high"] - table[k]["auc"] for k in names]])
    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=110)
    ax.barh(names, auc, xerr=err, color="tab:blue", alpha=0.8, capsize=4, label="AUC on sampled labels")
    ax.plot([results["auc_expected"][k] for k in names], names, "kD", ms=5,
            label="expected AUC (all impressions, truth-weighted)")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.3), ncol=2, frameon=False)
    ax.set_xlim(0.5, 1.0)
    ax.invert_yaxis()
    ax.set_xlabel(f"test CVR AUC ({results['test_conversions']} conversions; 95% bootstrap interval)")
    ax.set_title("experiment ceiling")
    ax.grid(axis="x", alpha=0.3)
    save_figure(fig, path)
