"""World parameters: validation and the schema they imply."""

from __future__ import annotations

import dataclasses

import pytest

from adfed.data.schema import SPARSE_VOCAB_THRESHOLD, Entity, FieldKind, ParamGroup, Visibility
from data_gen.params import WorldParams, build_schema


@pytest.mark.parametrize(("changes", "message"), [
    ({"num_users": 0}, r"WorldParams.num_users must be an int >= 1; got 0"),
    ({"num_ads": 10, "candidates_per_request": 20}, r"num_ads must be >= candidates_per_request"),
    ({"unobserved_fraction": 0.95}, r"unobserved_fraction must be in \[0, 0.9\); got 0.95"),
    ({"num_os": 1}, r"num_os must be >= 2; got 1"),
    ({"seq_len": 2.5}, r"seq_len must be an int >= 1; got 2.5"),
    ({"residual_corr": 1.5}, r"residual_corr must be in \[-1, 1\]"),
])
def test_bad_params_are_rejected_with_a_named_message(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorldParams(**changes)


def test_params_round_trip_through_a_dict() -> None:
    p = WorldParams(num_users=123, num_ads=456, days=7)
    assert WorldParams.from_dict({**p.to_dict(), "seed": 9}) == p
    assert p.num_advertisers == 456 // 25


def test_schema_fields_visibility_and_groups() -> None:
    p = WorldParams(num_users=50_000, num_ads=10_000)
    schema = build_schema(p)
    by = {f.name: f for f in schema.fields}
    assert by["user_id"].group is ParamGroup.LOCAL
    assert by["user_id"].visibility is Visibility.PRIVATE
    assert {f.name for f in schema.fields if f.visibility is Visibility.PRIVATE} == {
        "user_id", "installed_apps", "app_usage", "intent"}
    assert by["ad_id"].group is ParamGroup.SPARSE_SHARED  # 10k ads > threshold
    assert by["advertiser_id"].group is ParamGroup.DENSE_SHARED  # 400 advertisers
    assert by["app_usage"].kind is FieldKind.SEQUENCE and by["app_usage"].max_len == p.seq_len
    assert by["installed_apps"].kind is FieldKind.MULTI_HOT
    assert by["intent"].vocab_size == p.num_ad_categories
    assert by["hour"].entity is Entity.CONTEXT and by["hour"].vocab_size == 24
    assert all(f.description for f in schema.fields)
    small = build_schema(dataclasses.replace(p, num_ads=SPARSE_VOCAB_THRESHOLD))
    assert small.field("ad_id").group is ParamGroup.DENSE_SHARED
    assert schema.cloud_only().field("os").name == "os"
