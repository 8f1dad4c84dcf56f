"""Known-answer tests for mipsec.core.eap.aka_keys.

Vectors:
* FIPS 186-2 change notice 1, Appendix 3.1 general-purpose example (the
  generator RFC 4187 Appendix A cites): XKEY bd02... -> the first x_0.
* RFC 4186 Appendix A.5: MK -> K_encr, K_aut, MSK, EMSK (EAP-SIM and EAP-AKA
  share the generator and the key split of RFC 4187 §7).
* RFC 5448 Appendix C cases 1-4 (EAP-AKA'): CK', IK', K_encr, K_aut, K_re,
  MSK, EMSK.  Cases 1 and 2 are 3GPP TS 35.208 test set 19 run through
  Milenage, so they are also checked from K/OPc/SQN/AMF onwards.
"""

from __future__ import annotations

import hashlib
import hmac

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mipsec.core.eap.aka_keys import (
    at_mac,
    checkcode,
    ck_ik_prime,
    derive_aka,
    derive_aka_prime,
    fips186_2_prf,
    prf_prime,
)
from mipsec.core.eap.milenage import Milenage
from mipsec.core.errors import LocalProtocolError

H = bytes.fromhex


def test_fips186_2_general_purpose_example() -> None:
    x = fips186_2_prf(H("bd029bbe7f51960bcf9edb2b61f06f0feb5a38b6"), 40)
    assert x == H(
        "2070b3223dba372fde1c0ffc7b2e3b498b2606143c6c18bacb0f6c55babb13788e20d737a3275116"
    )


def test_rfc4186_a5_key_split() -> None:
    x = fips186_2_prf(H("e576d5ca332e9930018bf1baee2763c795b3c712"), 160)
    assert x[:16] == H("536e5ebc4465582aa6a8ec9986ebb620")  # K_encr
    assert x[16:32] == H("25af1942efcbf4bc72b3943421f2a974")  # K_aut
    assert x[32:96] == H(
        "39d45aeaf4e30601983e972b6cfd46d1c363773365690d09cd44976b525f47d3"
        "a60a985e955c53b090b2e4b73719196a402542968fd14a888f46b9a7886e4488"
    )
    assert x[96:160] == H(
        "5949eab0fff69d52315c6c634fd14a7f0d52023d56f79698fa6596abeed4f93f"
        "bb48eb534d985414ceed0d9a8ed33c387c9dfdab92ffbdf240fcecf65a2c93b9"
    )


def test_derive_aka_is_rfc4187_section7() -> None:
    # MK = SHA1(Identity|IK|CK) feeds the generator checked above.
    ident, ik, ck = (
        b"0001010000000001@wlan.mnc001.mcc001.3gppnetwork.org",
        H("11" * 16),
        H("22" * 16),
    )
    keys = derive_aka(ident, ik, ck)
    x = fips186_2_prf(hashlib.sha1(ident + ik + ck).digest(), 160)
    assert (keys.k_encr, keys.k_aut, keys.msk, keys.emsk) == (x[:16], x[16:32], x[32:96], x[96:])
    assert keys.k_re is None


RFC5448_CASES = [
    {
        "name": "WLAN",
        "ik": "9744871ad32bf9bbd1dd5ce54e3e2e5a",
        "ck": "5349fbe098649f948f5d2e973a81c00f",
        "autn": "bb52e91c747ac3ab2a5c23d15ee351d5",
        "ck'": "0093962d0dd84aa5684b045c9edffa04",
        "ik'": "ccfc230ca74fcc96c0a5d61164f5a76c",
        "k_encr": "766fa0a6c317174b812d52fbcd11a179",
        "k_aut": "0842ea722ff6835bfa2032499fc3ec23c2f0e388b4f07543ffc677f1696d71ea",
        "k_re": "cf83aa8bc7e0aced892acc98e76a9b2095b558c7795c7094715cb3393aa7d17a",
        "msk": "67c42d9aa56c1b79e295e3459fc3d187d42be0bf818d3070e362c5e967a4d544"
        "e8ecfe19358ab3039aff03b7c930588c055babee58a02650b067ec4e9347c75a",
        "emsk": "f861703cd775590e16c7679ea3874ada866311de290764d760cf76df647ea01c"
        "313f69924bdd7650ca9bac141ea075c4ef9e8029c0e290cdbad5638b63bc23fb",
    },
    {
        "name": "HRPD",
        "ik": "9744871ad32bf9bbd1dd5ce54e3e2e5a",
        "ck": "5349fbe098649f948f5d2e973a81c00f",
        "autn": "bb52e91c747ac3ab2a5c23d15ee351d5",
        "ck'": "3820f0277fa5f77732b1fb1d90c1a0da",
        "ik'": "db94a0ab557ef6c9ab48619ca05b9a9f",
        "k_encr": "05ad73ac915fce89ac77e1520d82187b",
        "k_aut": "5b4acaef62c6ebb8882b2f3d534c4b35277337a00184f20ff25d224c04be2afd",
        "k_re": "3f90bf5c6e5ef325ff04eb5ef6539fa8cca8398194fbd00be425b3f40dba10ac",
        "msk": "87b321570117cd6c95ab6c436fb5073ff15cf85505d2bc5bb7355fc21ea8a757"
        "57e8f86a2b138002e05752913bb43b82f868a96117e91a2d95f526677d572900",
        "emsk": "c891d5f20f148a1007553e2dea555c9cb672e9675f4a66b4bafa027379f93aee"
        "539a5979d0a0042b9d2ae28bed3b17a31dc8ab75072b80bd0c1da612466e402c",
    },
    {
        "name": "WLAN",
        "ik": "b0" * 16,
        "ck": "c0" * 16,
        "autn": "a0" * 16,
        "ck'": "cd4c8e5c68f57dd1d7d7dfd0c538e577",
        "ik'": "3ece6b705dbbf7dfc459a11280c65524",
        "k_encr": "897d302fa2847416488c28e20dcb7be4",
        "k_aut": "c40700e7722483ae3dc7139eb0b88bb558cb3081eccd057f9207d1286ee7dd53",
        "k_re": "0a591a22dd8b5b1cf29e3d508c91dbbdb4aee23051892c42b6a2de66ea504473",
        "msk": "9f7dca9e37bb22029ed986e7cd09d4a70d1ac76d95535c5cac40a7504699bb89"
        "61a29ef6f3e90f183de5861ad1bedc81ce9916391b401aa006c98785a5756df7",
        "emsk": "724de00bdb9e568187be3fe746114557d5018779537ee37f4d3c6c738cb97b9d"
        "c651bc19bfadc344ffe2b52ca78bd8316b51dacc5f2b1440cb9515521cc7ba23",
    },
    {
        "name": "HRPD",
        "ik": "b0" * 16,
        "ck": "c0" * 16,
        "autn": "a0" * 16,
        "ck'": "8310a71ce6f754889613da8f64d5fb46",
        "ik'": "5adf14360ae838192db23f6fcb7f8c76",
        "k_encr": "745e7439ba238f50fcac4d15d47cd1d9",
        "k_aut": "3e1d2aa4e677025cfd862a4be18361a13a645765571463df833a9759e8099879",
        "k_re": "99da835e2ae82462576fe6516fad1f802f0fa1191655dd0a273da96d04e0fcd3",
        "msk": "c6d3a6e0ceea951eb20d74f32c3061d0680a04b0b086ee8700ace3e0b95fa026"
        "83c287beee44432294ff98af26d2cc783bace75c4b0af7fdfeb5511ba8e4cbd0",
        "emsk": "7fb56813838adafa99d140c2f198f6dacebfb6afee444961105402b508c7f363"
        "352cb2919644b50463e6a69354150147ae09cbc54b8a651d8787a6893ed8536d",
    },
]


@pytest.mark.parametrize("case", RFC5448_CASES, ids=["case1", "case2", "case3", "case4"])
def test_rfc5448_appendix_c(case: dict[str, str]) -> None:
    ck_p, ik_p = ck_ik_prime(
        H(case["ck"]), H(case["ik"]), case["name"].encode(), H(case["autn"])[:6]
    )
    assert (ck_p, ik_p) == (H(case["ck'"]), H(case["ik'"]))
    keys = derive_aka_prime(b"0555444333222111", ik_p, ck_p)
    assert keys.k_encr == H(case["k_encr"])
    assert keys.k_aut == H(case["k_aut"])
    assert keys.k_re == H(case["k_re"])
    assert keys.msk == H(case["msk"])
    assert keys.emsk == H(case["emsk"])


def test_rfc5448_case1_from_milenage_test_set_19() -> None:
    # TS 35.208 test set 19 (K, OPc, SQN, AMF) produces the RAND/AUTN/CK/IK/RES of case 1.
    m = Milenage(H("5122250214c33e723a5dd523fc145fc0"), H("981d464c7c52eb6e5036234984ad0bcf"))
    rand, sqn, amf = H("81e92b6c0ee0e12ebceba8d92a99dfa5"), H("16f3b3f70fc2"), H("c3ab")
    v = m.f2345(rand)
    autn = bytes(a ^ b for a, b in zip(sqn, v.ak)) + amf + m.f1(rand, sqn, amf)
    assert autn == H(RFC5448_CASES[0]["autn"])
    assert v.res == H("28d7b0f2a2ec3de5")
    assert (v.ck, v.ik) == (H(RFC5448_CASES[0]["ck"]), H(RFC5448_CASES[0]["ik"]))


def test_mac_and_checkcode_algorithms() -> None:
    k, pkt = bytes(range(32)), b"\x01\x02\x00\x08\x17\x01\x00\x00"
    assert at_mac(False, k[:16], pkt, b"x") == hmac.digest(k[:16], pkt + b"x", "sha1")[:16]
    assert at_mac(True, k, pkt) == hmac.digest(k, pkt, "sha256")[:16]
    assert checkcode(False, b"") == b"" == checkcode(True, b"")
    assert checkcode(False, pkt) == hashlib.sha1(pkt).digest()
    assert checkcode(True, pkt) == hashlib.sha256(pkt).digest()


@given(st.binary(min_size=1, max_size=64), st.binary(max_size=80), st.integers(1, 300))
def test_prf_prime_is_a_prefix_stream(key: bytes, s: bytes, n: int) -> None:
    # Asking for fewer octets gives a prefix of asking for more (T1 | T2 | ...).
    long = prf_prime(key, s, n + 40)
    assert prf_prime(key, s, n) == long[:n]
    assert long[:32] == hmac.digest(key, s + b"\x01", "sha256")


@given(st.binary(min_size=20, max_size=20), st.integers(0, 200))
def test_fips_prf_is_a_prefix_stream(xkey: bytes, n: int) -> None:
    assert fips186_2_prf(xkey, n) == fips186_2_prf(xkey, 200)[:n]


def test_bad_inputs_are_local_errors() -> None:
    with pytest.raises(LocalProtocolError):
        fips186_2_prf(bytes(19), 16)
    with pytest.raises(LocalProtocolError):
        ck_ik_prime(bytes(16), bytes(16), b"", bytes(6))
    with pytest.raises(LocalProtocolError):
        ck_ik_prime(bytes(16), bytes(16), b"WLAN", bytes(5))


def test_keys_repr_hides_secrets() -> None:
    keys = derive_aka_prime(b"x", bytes(range(16)), bytes(range(16, 32)))
    text = repr(keys)
    for secret in (keys.k_encr, keys.k_aut, keys.msk, keys.emsk, keys.k_re):
        assert secret is not None and secret.hex() not in text
