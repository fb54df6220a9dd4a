"""FusedAdam: bitwise torch.optim.Adam(fused=True), with less bookkeeping per step."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from adfed.model.fused_adam import FusedAdam


def _params(seed: int) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((7, 5), (5,), (3, 4, 2), (1,))]


def _run(cls: Any, seed: int, *, reload_at: int | None = None, **kwargs: Any) -> tuple[list[torch.Tensor], dict]:
    params = _params(seed)
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.02}]
    opt = cls(groups, lr=0.05, **kwargs) if cls is FusedAdam else cls(groups, lr=0.05, fused=True, **kwargs)
    gen = torch.Generator().manual_seed(seed + 100)
    for step in range(7):
        for j, p in enumerate(params):
            # some parameters miss some steps (no gradient: untouched, step count kept)
            p.grad = None if (step + j) % 4 == 3 else torch.randn(p.shape, generator=gen)
        if step == 4:
            opt.param_groups[0]["lr"] = 0.01  # a schedule changes lr between steps
        if step == reload_at:
            saved = opt.state_dict()
            opt = cls(groups, lr=0.05, **kwargs) if cls is FusedAdam else cls(groups, lr=0.05, fused=True, **kwargs)
            opt.load_state_dict(saved)
        opt.step()
    return [p.detach().clone() for p in params], opt.state_dict()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(a.view(torch.int32), b.view(torch.int32))


@pytest.mark.parametrize("kwargs", [{}, {"weight_decay": 0.1}, {"betas": (0.8, 0.99), "eps": 1e-6}])
@pytest.mark.parametrize("reload_at", [None, 3])
def test_bitwise_torch_fused_adam(kwargs: dict[str, Any], reload_at: int | None) -> None:
    ours, our_state = _run(FusedAdam, 0, reload_at=reload_at, **kwargs)
    ref, ref_state = _run(torch.optim.Adam, 0, reload_at=reload_at, **kwargs)
    assert all(_same(a, b) for a, b in zip(ours, ref, strict=True))
    for k, s in ref_state["state"].items():
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert _same(our_state["state"][k][name], s[name])


def test_takes_the_fast_path_after_the_first_step(monkeypatch: pytest.MonkeyPatch) -> None:
    params = _params(1)
    opt = FusedAdam(params, lr=0.1)
    calls: list[int] = []
    real = torch.optim.Adam.step

    def counted(self: torch.optim.Adam, closure: Any = None) -> Any:
        calls.append(1)
        return real(self, closure)

    monkeypatch.setattr(torch.optim.Adam, "step", counted)
    for _ in range(3):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
    assert len(calls) == 1  # the first step creates the state; the others are direct
    params.append(torch.nn.Parameter(torch.zeros(2)))
    opt.add_param_group({"params": params[-1:]})
    params[-1].grad = torch.ones(2)
    opt.step()  # a parameter without state yet: Adam.step again
    assert len(calls) == 2


def test_closure_and_amsgrad_go_to_adam() -> None:
    params = _params(2)
    opt = FusedAdam(params, lr=0.1)
    for p in params:
        p.grad = torch.ones_like(p)
    assert opt.step(lambda: 1.5) == 1.5
    # a group with amsgrad goes to Adam's own step: the same bits as torch's fused amsgrad
    def amsgrad_run(cls: Any, amsgrad: bool) -> list[torch.Tensor]:
        params = _params(2)
        kw = {} if cls is FusedAdam else {"fused": True}
        opt = cls([{"params": params, "amsgrad": amsgrad}], lr=0.1, **kw)
        gen = torch.Generator().manual_seed(9)
        for step in range(5):
            for p in params:  # shrinking gradients: amsgrad's running max then differs from Adam
                p.grad = torch.randn(p.shape, generator=gen) * (5 - step)
            opt.step()
        return [p.detach().clone() for p in params]

    ours, ref = amsgrad_run(FusedAdam, True), amsgrad_run(torch.optim.Adam, True)
    assert all(_same(a, b) for a, b in zip(ours, ref, strict=True))
    plain = amsgrad_run(FusedAdam, False)
    assert any(not _same(a, b) for a, b in zip(ours, plain, strict=True))  # amsgrad did act
