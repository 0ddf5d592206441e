"""AmneziaWG parameter sets: reading UAPI/.conf values and the validation a user sees
(docs/PROTOCOL.md: AmneziaWG 1.0, Parameter validation, 3.x quirks)."""

from __future__ import annotations

import base64

import pytest

from awg_split_tunnel.errors import ConfigError
from awg_split_tunnel.provider.amneziawg.params import AmneziaParams, timer_overrides
from awg_split_tunnel.provider.wireguard.value_range import Range

KEY = bytes(range(0x80, 0xA0))
RUN_D = {
    "jc": 3,
    "jmin": 50,
    "jmax": 60,
    "s1": 37,
    "s2": 61,
    "s3": 11,
    "s4": 7,
    "h1": "100-199",
    "h2": "200-299",
    "h3": "300-399",
    "h4": "400-499",
    "i1": "<b 0xc0ffee><r 5><t>",
}


def errors_of(**values: object) -> list[str]:
    return AmneziaParams.from_mapping(values).validate()


# -- reading values ----------------------------------------------------------------------------------


def test_everything_unset_is_plain_wireguard() -> None:
    params = AmneziaParams()
    assert params.is_plain
    assert params.generation == "wireguard"
    assert params.validate() == []


def test_a_2_0_config_is_read_from_conf_style_strings() -> None:
    params = AmneziaParams.from_mapping(RUN_D)
    assert params.validate() == []
    assert (params.jc, params.jmin, params.jmax) == (3, 50, 60)
    assert params.prefixes == (37, 61, 11, 7)
    assert params.headers == (Range(100, 199), Range(200, 299), Range(300, 399), Range(400, 499))
    assert len(params.i_packets) == 1 and params.i_packets[0].size == 12
    assert not params.is_plain
    assert params.generation == "2.0"


def test_keys_are_case_insensitive_and_accept_ints_and_ranges() -> None:
    params = AmneziaParams.from_mapping({"Jc": "4", "H1": 123456, "H2": Range(7, 9), "S1": 10})
    assert (
        params.jc == 4 and params.h1 == Range.single(123456) and params.h2 == Range(7, 9) and params.s1 == 10
    )


def test_conf_spellings_of_the_3x_keys_are_understood() -> None:
    params = AmneziaParams.from_mapping(
        {"ContentPaddingAddition": "10-20", "RandomTrailers": "on", "MaxHandshakeAttempts": "2"}
    )
    assert params.content_padding_addition == Range(10, 20)
    assert params.random_trailers and params.max_handshake_attempts == Range(2, 2)
    assert params.generation == "3.x"


def test_the_header_protection_key_is_read_from_base64_or_hex() -> None:
    from_b64 = AmneziaParams.from_mapping({"header_protection_key": base64.b64encode(KEY).decode()})
    from_hex = AmneziaParams.from_mapping({"header_protection_key": KEY.hex()})
    assert from_b64.header_protection_key == from_hex.header_protection_key == KEY
    assert from_b64.header_protection


def test_an_all_zero_key_means_no_header_protection() -> None:
    params = AmneziaParams.from_mapping({"header_protection_key": "A" * 43 + "="})
    assert params.header_protection_key == bytes(32)
    assert not params.header_protection and params.is_plain


@pytest.mark.parametrize(
    ("text", "value"), [("on", True), ("OFF", False), ("1", True), ("0", False), ("true", True)]
)
def test_booleans_accept_on_off_and_numbers(text: str, value: bool) -> None:
    assert AmneziaParams.from_mapping({"random_trailers": text}).random_trailers is value


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("jc", "many"),
        ("h1", "5-3"),
        ("h2", "1-2-3"),
        ("header_protection_key", "abcd"),
        ("random_trailers", "maybe"),
        ("mtu", 1),
    ],
)
def test_malformed_values_raise_a_config_error_naming_the_key(key: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        AmneziaParams.from_mapping({key: value}, file="nl.conf")
    assert info.value.key == key
    assert "nl.conf" in str(info.value)


def test_1_5_keys_are_accepted_ignored_and_warned_about() -> None:
    params = AmneziaParams.from_mapping({"jc": 2, "jmin": 10, "jmax": 20, "j1": "<b 0x01>", "itime": 60})
    assert params.validate() == []
    assert params.generation == "1.5"
    assert any("J1" in w and "ignored" in w for w in params.warnings())
    assert any("Itime" in w for w in params.warnings())


def test_a_1_5_template_with_the_counter_tag_keeps_working_with_a_warning() -> None:
    params = AmneziaParams.from_mapping({"i1": "<b 0xc0ffee><c><t>"})
    assert params.validate() == []
    assert params.i_packets[0].size == 3 + 8 + 4
    assert any("<c>" in w for w in params.warnings())


def test_timer_overrides_hold_only_the_set_ranges() -> None:
    params = AmneziaParams.from_mapping(
        {"rekey_timeout": "1-2", "max_handshake_attempts": "3", "keepalive_timeout": 0}
    )
    assert timer_overrides(params) == {"rekey_timeout": Range(1, 2), "max_handshake_attempts": Range(3, 3)}
    assert params.is_plain  # timers do not change the wire format
    assert timer_overrides(AmneziaParams()) == {}


# -- validation: what amneziawg-go refuses --------------------------------------------------------------


def test_overlapping_header_ranges_are_refused() -> None:
    errors = errors_of(h1="100-200", h2="150-300", h3="400", h4="500")
    assert len(errors) == 1
    assert "H1 100-200 overlaps H2 150-300" in errors[0]


def test_a_header_overlapping_the_default_of_an_unset_one_is_refused_with_a_hint() -> None:
    errors = errors_of(h1="2")
    assert any("overlaps H2 2 (default)" in e and "set all four" in e for e in errors)


def test_header_protection_needs_every_prefix_of_at_least_twelve() -> None:
    errors = errors_of(header_protection_key=KEY.hex(), s1=12, s2=11, s3=40, s4=0)
    assert len(errors) == 2
    assert errors[0].startswith("S2 is 11") and errors[1].startswith("S4 is 0")
    assert errors_of(header_protection_key=KEY.hex(), s1=12, s2=12, s3=12, s4=12) == []


def test_a_key_of_the_wrong_length_is_refused() -> None:
    assert any("32 bytes" in e for e in AmneziaParams(header_protection_key=b"\x01" * 16).validate())


def test_bad_templates_are_reported_per_key_with_every_problem() -> None:
    errors = errors_of(i1="<b 0x123><x>", i3="<r -5>")
    assert errors == [
        "I1: <b 0x123>: odd number of hex digits",
        "I1: unknown tag <x>",
        "I3: <r -5>: the byte count must not be negative",
    ]


def test_prefixes_above_16_bits_are_refused() -> None:
    assert any("S3 70000" in e for e in errors_of(s3=70000))


# -- validation: the gaps a careful implementation closes ----------------------------------------------


def test_jmax_below_jmin_is_refused_when_junk_is_sent() -> None:
    assert any("Jmax (10) is below Jmin (20)" in e for e in errors_of(jc=2, jmin=20, jmax=10))
    assert errors_of(jc=0, jmin=20, jmax=10) == []


def test_jc_of_zero_is_accepted_as_off() -> None:
    assert errors_of(jc=0, jmin=0, jmax=0) == []


def test_junk_plus_i_packets_must_fit_one_send_batch() -> None:
    assert errors_of(jc=126, jmin=10, jmax=20, i1="<r 1>") == []
    errors = errors_of(jc=127, jmin=10, jmax=20, i1="<r 1>")
    assert len(errors) == 1 and "keep Jc <= 126" in errors[0]


def test_the_full_32_bit_header_range_is_refused() -> None:
    errors = errors_of(h1="0-4294967295", h2="4294967295")
    assert any("full 32-bit range" in e for e in errors)


def test_timer_ranges_must_start_at_one() -> None:
    errors = errors_of(rekey_timeout="0-3", keepalive_timeout="0")
    assert len(errors) == 1 and "RekeyTimeout 0-3 starts at 0" in errors[0]


def test_negative_numbers_are_refused() -> None:
    errors = AmneziaParams(jc=-1, s1=-2).validate()
    assert any("Jc must not be negative" in e for e in errors)
    assert any("S1 must not be negative" in e for e in errors)


def test_check_raises_one_config_error_with_every_message_and_the_first_key() -> None:
    params = AmneziaParams.from_mapping({"jc": 2, "jmin": 9, "jmax": 3, "i2": "<zz>"})
    with pytest.raises(ConfigError) as info:
        params.check(file="a.conf", line=7)
    assert info.value.key == "jmax"
    assert "Jmax (3) is below Jmin (9)" in str(info.value) and "I2: unknown tag <zz>" in str(info.value)
    assert str(info.value).startswith("a.conf:7, key 'jmax':")


# -- 1.0 configs --------------------------------------------------------------------------------------


def test_a_typical_1_0_config_is_valid() -> None:
    params = AmneziaParams.from_mapping(
        {"jc": 4, "jmin": 40, "jmax": 70, "s1": 0, "s2": 0, "h1": 1, "h2": 2, "h3": 3, "h4": 4}
    )
    assert params.validate() == [] and params.generation == "1.0"
    params = AmneziaParams.from_mapping(
        {
            "jc": 4,
            "jmin": 40,
            "jmax": 70,
            "s1": 15,
            "s2": 68,
            "h1": 1020325451,
            "h2": 3288052141,
            "h3": 1766607858,
            "h4": 2356934485,
        }
    )
    assert params.validate() == [] and params.warnings() == []


def test_a_1_0_header_of_0_to_4_other_than_its_default_is_refused() -> None:
    errors = errors_of(jc=1, jmin=10, jmax=20, h1=2, h2=1, h3=3, h4=4)
    assert any(e.startswith("H1 = 2: AmneziaWG 1.0") for e in errors)
    assert any(e.startswith("H2 = 1: AmneziaWG 1.0") for e in errors)


def test_s2_equal_to_s1_plus_56_is_a_1_0_warning() -> None:
    params = AmneziaParams.from_mapping({"s1": 10, "s2": 66, "h1": 5, "h2": 6, "h3": 7, "h4": 8})
    assert params.validate() == []
    assert any("S2 = S1 + 56" in w for w in params.warnings())


# -- warnings -----------------------------------------------------------------------------------------


def test_a_response_prefix_four_above_s4_warns_about_the_receiver_index() -> None:
    params = AmneziaParams.from_mapping({"s2": 20, "s4": 16, "h1": 5, "h2": "6-1000", "h3": 1001, "h4": 1002})
    assert any("S2 = S4 + 4" in w and "receiver index" in w for w in params.warnings())
    protected = AmneziaParams.from_mapping(
        {"s1": 12, "s2": 20, "s3": 12, "s4": 16, "header_protection_key": KEY.hex()}
    )
    assert not any("S2 = S4" in w for w in protected.warnings())


def test_rekeying_after_the_reject_time_is_warned_about() -> None:
    params = AmneziaParams.from_mapping({"rekey_after_time": "100-200"})
    assert any("RekeyAfterTime reaches 200" in w for w in params.warnings())


@pytest.mark.parametrize(
    ("values", "generation"),
    [
        ({}, "wireguard"),
        ({"rekey_timeout": "2"}, "3.x"),
        ({"jc": 3, "jmin": 10, "jmax": 20, "s1": 5, "s2": 9, "h1": 5, "h2": 6, "h3": 7, "h4": 8}, "1.0"),
        ({"i1": "<b 0x01><c>"}, "1.5"),
        ({"s3": 4}, "2.0"),
        ({"h1": "5-9", "h2": 10, "h3": 11, "h4": 12}, "2.0"),
        ({"i2": "<r 10>"}, "2.0"),
        ({"s1": 12, "s2": 12, "s3": 12, "s4": 12, "header_protection_key": KEY.hex()}, "3.x"),
        ({"content_padding_addition": "1-5"}, "3.x"),
    ],
)
def test_the_generation_a_set_needs_is_recognised(values: dict[str, object], generation: str) -> None:
    assert AmneziaParams.from_mapping(values).generation == generation
