"""The privacy experiment's ε-sweep plot names the mechanism its runs used."""

from __future__ import annotations

from pathlib import Path

import pytest

from experiments import plotting, privacy


@pytest.mark.parametrize(("mechanism", "name"), [("dp_ftrl", "DP-FTRL"), ("dp_fedavg", "DP-FedAvg"),
                                                  (None, "DP-FedAvg")])  # None: results.json from before
def test_the_sweep_plot_names_the_mechanism(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            mechanism: str | None, name: str) -> None:
    # Prepare: a sweep's results, and the labels the plot is saved with
    row = {"auc": 0.6, "auc_expected": 0.61, "mechanism": mechanism}
    runs = {k: dict(row) for k in ("non_private", "eps_inf", *(f"eps_{e:g}" for e in privacy.EPSILONS))}
    results = {"population": 1000, "clients_per_round": 10, "rounds": 3, "runs": runs}
    labels: list[str] = []
    real_save = plotting.save

    def save(fig, ax, path, title):  # noqa: ANN001, ANN202
        labels.extend(line.get_label() for line in ax.get_lines())
        real_save(fig, ax, path, title)

    monkeypatch.setattr(plotting, "save", save)

    # Execute
    privacy.plot_sweep(results, tmp_path / "sweep.png")

    # Assert
    assert f"CVR AUC, {name}" in labels and f"expected CVR AUC, {name}" in labels
    assert (tmp_path / "sweep.png").stat().st_size > 0
