"""The etcd key layout and VIP maths (pure)."""

from __future__ import annotations

import pytest

from federation import keys
from federation.vip import VipExhaustedError, allocate, free_vips
from mesh.errors import MeshError
from mesh.naming import ServiceKey

ECHO = ServiceKey("demo", "echo")


def test_layout() -> None:
    assert keys.info_key("east") == "/fedgate/clusters/east/info"
    assert keys.export_key("east", ECHO) == "/fedgate/clusters/east/exports/demo/echo"
    assert keys.vip_key(ECHO) == "/fedgate/vips/demo/echo"
    assert keys.policy_key(ECHO) == "/fedgate/config/policies/demo/echo"


def test_cluster_keys_roundtrip() -> None:
    assert keys.parse_cluster_key(keys.info_key("east")) == keys.ClusterKey("east", None)
    parsed = keys.parse_cluster_key(keys.export_key("east", ECHO))
    assert parsed == keys.ClusterKey("east", ECHO)
    assert keys.parse_service_key(keys.VIPS_PREFIX, keys.vip_key(ECHO)) == ECHO


@pytest.mark.parametrize(
    "key",
    [
        "/fedgate/clusters/east",
        "/fedgate/clusters/east/",
        "/fedgate/clusters/East/info",
        "/fedgate/clusters/east/info/x",
        "/fedgate/clusters/east/exports/demo",
        "/fedgate/clusters/east/exports/demo/echo/x",
        "/fedgate/clusters/east/exports/Demo/echo",
        "/fedgate/clusters/east/status",
        "/fedgate/vips/demo/echo",
    ],
)
def test_off_layout_cluster_keys_are_refused(key: str) -> None:
    with pytest.raises(keys.KeyLayoutError):
        keys.parse_cluster_key(key)


def test_cluster_names_cannot_escape_their_prefix() -> None:
    with pytest.raises(MeshError, match="RFC 1123"):
        keys.cluster_prefix("east/../west")


def test_vips_lowest_free_skipping_0_and_255() -> None:
    assert allocate(3, []) == ["10.255.0.1", "10.255.0.2", "10.255.0.3"]
    assert allocate(1, ["10.255.0.1", "10.255.0.3"]) == ["10.255.0.2"]
    full_first_block = [f"10.255.0.{i}" for i in range(1, 255)]
    assert allocate(2, full_first_block) == ["10.255.1.1", "10.255.1.2"]
    assert allocate(1, ["garbage", "10.255.0.1"]) == ["10.255.0.2"]
    assert allocate(0, []) == []


def test_vip_range_size_and_exhaustion() -> None:
    all_vips = list(free_vips([]))
    assert len(all_vips) == 256 * 254
    assert all_vips[-1] == "10.255.255.254"
    with pytest.raises(VipExhaustedError):
        allocate(2, all_vips[1:])
