"""The DNS redirect's nftables text (no kernel needed)."""

from __future__ import annotations

from awg_split_tunnel.platform.linux.dns_redirect import DNS_TABLE, redirect_text, removal_text
from awg_split_tunnel.platform.linux.kernel_rules import MARK_MASK


def test_each_resolver_address_goes_to_its_listener_for_udp_and_tcp() -> None:
    text = redirect_text({"127.0.0.53": 40001, "::1": 40002})
    assert "ip daddr 127.0.0.53 udp dport 53 redirect to :40001" in text
    assert "ip daddr 127.0.0.53 tcp dport 53 redirect to :40001" in text
    assert "ip6 daddr ::1 udp dport 53 redirect to :40002" in text
    assert "ip6 daddr ::1 tcp dport 53 redirect to :40002" in text


def test_our_own_marked_queries_are_never_redirected_and_come_before_any_redirect() -> None:
    text = redirect_text({"127.0.0.53": 40001})
    skip = text.index(f"meta mark and 0x{MARK_MASK:08x} != 0 accept")
    assert skip < text.index("redirect to")


def test_the_table_is_replaced_atomically_and_removable_when_absent() -> None:
    text = redirect_text({})
    assert text.startswith(f"table inet {DNS_TABLE}\ndelete table inet {DNS_TABLE}\n")
    assert removal_text() == f"table inet {DNS_TABLE}\ndelete table inet {DNS_TABLE}\n"
