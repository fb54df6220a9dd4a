"""The device model as a phone runs it: one request's scorer, exported to ONNX.

:class:`RequestScorer` computes what :class:`~adfed.model.pcvr.PCVRModel` computes for
the N candidates of one request, in operations ONNX has (gathers, masked sums, matmuls),
from inputs shaped the way a request arrives::

    user fields      int64 [1] each       (categorical; the phone's own)
    user bags        int64 [1, L] each    (ids, padded with -1; L per field, any)
    context fields   int64 [1] each
    ad fields        int64 [N] each       (the candidates' ids and attributes)
    dense fields     float32 [1] or [N]   (by entity)
    local.<param>    float32 [1, ...]     (the phone's LOCAL rows: its user_id embedding
                                           and user bias; inputs, so that personalising
                                           them needs no new export)
    ->  pctr, pcvr, pctcvr  float32 [N]

The user and context embeddings are looked up once and broadcast over the candidates.
The global weights (dense_shared and sparse_shared) are constants of the graph. The
exporter is torch's TorchScript-based ``torch.onnx.export(..., dynamo=False)``: it needs
no onnxscript and exports the same graph on every torch from 2.4; ``test_export``
checks every candidate's scores against the torch model to 1e-5.
"""

from __future__ import annotations

import dataclasses
import io
import warnings
from collections.abc import Collection, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from adfed.data.examples import Examples
from adfed.data.schema import USER_KEY, Entity, FieldKind, FieldSpec, ParamGroup, Visibility
from adfed.errors import AdfedError
from adfed.model.pcvr import PCVRModel
from adfed.rerank.requests import RequestError

OUTPUTS = ("pctr", "pcvr", "pctcvr")
#: the padding id of a bag input (ids >= 0 are real)
PAD = -1


class ExportError(AdfedError, ValueError):
    """The model cannot be exported for these requests."""


@dataclasses.dataclass(frozen=True)
class Input:
    """One graph input: its name, the field (or local parameter) it feeds, its shape."""

    name: str
    field: FieldSpec | None  # None for a local parameter
    shape: tuple[int | str, ...]
    dtype: str  # "int64" | "float32"


def _is_local(f: FieldSpec) -> bool:
    return f.group is ParamGroup.LOCAL


def graph_inputs(model: PCVRModel) -> list[Input]:
    """The inputs of ``model``'s request graph, in order (see the module docstring)."""
    out: list[Input] = []
    emb = model.embeddings
    for f in emb.embedded:
        if _is_local(f):
            continue
        if f.is_bag:
            out.append(Input(f.name, f, (1, f"len_{f.name}"), "int64"))
        else:
            out.append(Input(f.name, f, ("n",) if f.entity is Entity.AD else (1,), "int64"))
    for name in emb.dense_names:
        f = model.schema.field(name)
        out.append(Input(name, f, ("n",) if f.entity is Entity.AD else (1,), "float32"))
    for name, group in model.parameter_groups().items():
        if group is ParamGroup.LOCAL:
            shape = tuple(model.get_parameter(name).shape[1:])
            out.append(Input(f"local.{name}", None, (1, *shape), "float32"))
    return out


def check_exportable(model: PCVRModel, available: Collection[str]) -> None:
    """Refuse a model that reads a field the requests cannot supply.

    ``available``: the field names a request on the phone can fill (its own user fields,
    the context, the ads' fields). A PRIVATE field missing there means the phone lacks
    data the model was trained on; any other missing field is refused too.

    Raises
    ------
    ExportError : one line naming the fields.
    """
    need = [f for f in model.schema.fields if not _is_local(f)]
    private = sorted(f.name for f in need if f.visibility is Visibility.PRIVATE and f.name not in available)
    if private:
        raise ExportError(f"the model reads private field(s) {', '.join(private)} that the requests lack; "
                          f"export a model trained without them or give the phone those fields")
    other = sorted(f.name for f in need if f.name not in available)
    if other:
        raise ExportError(f"the model reads field(s) {', '.join(other)} that the requests lack")


class RequestScorer(nn.Module):
    """``model``'s scores for one request's candidates (see the module docstring).

    Parameters
    ----------
    model : a trained PCVRModel (any ``user_rows``: its local rows are inputs here).
    """

    def __init__(self, model: PCVRModel) -> None:
        super().__init__()
        self.model = model
        self.inputs = graph_inputs(model)
        emb = model.embeddings
        self._local_user = next((f.name for f in emb.embedded if _is_local(f)), None)
        self._index = {inp.name: i for i, inp in enumerate(self.inputs)}

    def _table(self, f: FieldSpec) -> torch.Tensor:
        return self.model.get_parameter("embeddings." + self.model.embeddings.param_name(f.name))

    def _bag(self, f: FieldSpec, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """ids int64 [1, L] padded with PAD -> pooled [1, D], length float [1]."""
        mask = (ids >= 0).to(torch.float32)  # [1, L]
        rows = F.embedding(ids.clamp(min=0), self._table(f))  # [1, L, D]
        total = (rows * mask.unsqueeze(2)).sum(dim=1)
        n = mask.sum(dim=1)
        mode = self.model.embeddings.bag_pooling
        if mode == "sum":
            return total, n
        denom = n.clamp(min=1.0)
        return total / (denom if mode == "mean" else denom.sqrt()).unsqueeze(1), n

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        inp = {i.name: a for i, a in zip(self.inputs, args, strict=True)}
        model, emb = self.model, self.model.embeddings
        n = next(inp[f.name] for f in emb.embedded if f.entity is Entity.AD).shape[0]
        pooled: list[torch.Tensor] = []
        sizes: list[torch.Tensor] = []
        lengths: dict[str, torch.Tensor] = {}
        for f in emb.embedded:
            if _is_local(f):
                row = inp[f"local.{model.table_name(f.name)}"]
            elif f.is_bag:
                row, lengths[f.name] = self._bag(f, inp[f.name])
                sizes.append(torch.log1p(lengths[f.name]).expand(n).unsqueeze(1))
            else:
                row = F.embedding(inp[f.name], self._table(f))
            pooled.append(row.expand(n, -1))
        dense = [inp[name].to(torch.float32).expand(n).unsqueeze(1) for name in emb.dense_names]
        inter = model.interaction
        parts = [*pooled, *dense, *sizes]
        if inter.out_features:
            ads = torch.stack([pooled[i] for i in inter.ad_fields], dim=1)
            others = torch.stack([pooled[i] for i in inter.other_fields], dim=1)
            parts.append(torch.bmm(others, ads.transpose(1, 2)).flatten(1))
        ctr, cvr = model.towers(torch.cat(parts, dim=1))
        if model.match is not None:
            counts = [((inp[bag] == inp[ad].unsqueeze(1)) & (inp[bag] >= 0)).to(torch.float32).sum(dim=1)
                      for bag, ad in model.match.pairs]
            offset = torch.stack(counts, dim=1) @ model.match.weight
            ctr, cvr = ctr + offset[:, 0], cvr + offset[:, 1]
        if model.user_bias is not None:
            bias = inp["local.user_bias.weight"]
            ctr, cvr = ctr + bias[:, 0], cvr + bias[:, 1]
        pctr, pcvr = torch.sigmoid(ctr), torch.sigmoid(cvr)
        return pctr, pcvr, pctr * pcvr


def local_rows(model: PCVRModel, user_id: int) -> dict[str, np.ndarray]:
    """The LOCAL rows of ``user_id`` in a full-size model (one row per user), or of
    row 0 in a phone's model (``user_rows=1``), as ``local.<param>`` inputs [1, ...]."""
    out = {}
    for name, group in model.parameter_groups().items():
        if group is ParamGroup.LOCAL:
            table = model.get_parameter(name).detach()
            row = user_id if table.shape[0] > 1 else 0
            out[f"local.{name}"] = table[row : row + 1].numpy().astype(np.float32)
    return out


def request_inputs(inputs: list[Input], examples: Examples, *, local: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The graph's feed for one request from its candidate rows (``request_examples``
    of one request: N rows that share the user and the context).

    Raises
    ------
    RequestError : the rows lack a field the graph reads, or hold no candidate.
    """
    if len(examples) == 0:
        raise RequestError("the candidate list is empty; send at least one ad")
    feed: dict[str, np.ndarray] = {}
    for inp in inputs:
        if inp.field is None:
            if inp.name not in local:
                raise RequestError(f"the phone's local state lacks {inp.name[len('local.'):]}")
            feed[inp.name] = np.ascontiguousarray(local[inp.name], dtype=np.float32)
            continue
        f, per_ad = inp.field, inp.shape[0] == "n"
        try:
            if f.is_bag:
                values, offsets = examples.bags[f.name]
                feed[inp.name] = values[offsets[0] : offsets[1]].astype(np.int64).reshape(1, -1)
            elif f.kind is FieldKind.DENSE:
                col = examples.dense[f.name]
                feed[inp.name] = (col if per_ad else col[:1]).astype(np.float32)
            else:
                col = examples.ids[f.name]
                feed[inp.name] = (col if per_ad else col[:1]).astype(np.int64)
        except KeyError:
            raise RequestError(f"the request lacks field {f.name!r}, which the device model reads") from None
    return feed


def export_onnx(model: PCVRModel, available: Collection[str], example: Mapping[str, np.ndarray]) -> bytes:
    """The ONNX bytes of ``model``'s :class:`RequestScorer` (opset 17; N and every bag
    length dynamic). ``example``: a feed of :func:`request_inputs` to trace with.

    Raises
    ------
    ExportError : the model reads a field not in ``available`` (:func:`check_exportable`).
    """
    check_exportable(model, available)
    scorer = RequestScorer(model).eval()
    args = tuple(torch.from_numpy(np.asarray(example[i.name])) for i in scorer.inputs)
    dynamic = {i.name: {k: str(d) for k, d in enumerate(i.shape) if isinstance(d, str)} for i in scorer.inputs}
    dynamic.update({o: {0: "n"} for o in OUTPUTS})
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(scorer, args, buf,  # type: ignore[arg-type]  # file-like objects are accepted
                          input_names=[i.name for i in scorer.inputs],
                          output_names=list(OUTPUTS), dynamic_axes=dynamic, opset_version=17,
                          dynamo=False)
    return buf.getvalue()


class OnnxScorer:
    """An onnxruntime session over an exported request graph, on ``threads`` threads.

    Raises
    ------
    RequestError : from :meth:`score` when the feed lacks an input.
    """

    def __init__(self, onnx_bytes: bytes, *, threads: int = 1) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(onnx_bytes, opts, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]

    def score(self, feed: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(pctr, pcvr, pctcvr), float32 [N] each."""
        missing = [n for n in self.input_names if n not in feed]
        if missing:
            raise RequestError(f"the request lacks {', '.join(missing)}, which the device model reads")
        pctr, pcvr, pctcvr = self.session.run(list(OUTPUTS), {n: feed[n] for n in self.input_names})
        return pctr, pcvr, pctcvr


def available_fields(examples: Examples) -> set[str]:
    """The field names a request's rows carry (for :func:`check_exportable`)."""
    return {*examples.ids, *examples.dense, *examples.bags} - {USER_KEY}
