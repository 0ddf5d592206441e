"""Linux TUN interfaces: open, read and write IP packets, configure addresses, MTU and routes.

With ``vnet_hdr=True`` every read and write carries a virtio-net header, as in wireguard-go. Writing,
`write_packets` merges consecutive segments of one TCP flow into a GSO super-packet (GRO done in
userspace): one syscall and one pass through the kernel's stack per run instead of per packet. Reading,
``read_offload=True`` also lets the kernel hand over TSO super-packets that `offload_segments` cuts into
MTU-size segments with their checksums; measured bridging two TUNs, that Python segmentation (~6 µs per
segment) costs more than the per-packet reads it saves (1.1 vs 2.6 Gbit/s), so the `tun` command keeps
reads MTU-size. Addresses, MTU and routes are set with the `ip` command (iproute2).
"""

from __future__ import annotations

import errno
import fcntl
import ipaddress
import os
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass

from awg_split_tunnel.errors import TunnelError

TUN_PATH = "/dev/net/tun"
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUN_F_CSUM = 0x01
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
VNET_HDR = struct.Struct("<BBHHHH")  # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_SIZE = VNET_HDR.size
_NO_VNET_HDR = bytes(VNET_HDR_SIZE)

MAX_PACKET = 65535
IFNAMSIZ = 16

Interface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(slots=True)
class TunStats:
    """Counters of what the TUN side saw; malformed offload reads are dropped and counted."""

    reads: int = 0
    packets_read: int = 0
    super_packets: int = 0
    dropped_malformed: int = 0
    writes: int = 0


class Tun:
    """An open TUN interface (non-blocking). One `read_packets` call drains up to `batch` reads."""

    __slots__ = ("_buf", "_view", "fd", "name", "stats", "vnet_hdr")

    def __init__(self, fd: int, name: str, vnet_hdr: bool) -> None:
        self.fd = fd
        self.name = name
        self.vnet_hdr = vnet_hdr
        self.stats = TunStats()
        self._buf = bytearray(MAX_PACKET + VNET_HDR_SIZE)
        self._view = memoryview(self._buf)

    @classmethod
    def open(cls, name: str = "", *, vnet_hdr: bool = False, read_offload: bool = True) -> Tun:
        """Create (or attach to) TUN interface `name`; the kernel picks a name when it is empty.

        `vnet_hdr` adds the virtio-net header to every read and write, which lets `write_packets` hand
        coalesced TCP super-packets to the kernel. `read_offload` (with `vnet_hdr`) also lets the kernel
        give us TSO super-packets to read, which we must then cut up ourselves; without it reads stay
        MTU-size packets."""
        if sys.platform != "linux":  # also tells mypy --platform win32 to skip the rest
            raise TunnelError("TUN devices need Linux")
        if len(name.encode()) >= IFNAMSIZ:
            raise TunnelError(f"interface name {name!r} is longer than {IFNAMSIZ - 1} bytes")
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError as exc:
            raise TunnelError(f"{TUN_PATH} does not exist: load the 'tun' kernel module") from exc
        except PermissionError as exc:
            raise TunnelError(f"cannot open {TUN_PATH}: needs root (or CAP_NET_ADMIN)") from exc
        flags = IFF_TUN | IFF_NO_PI | (IFF_VNET_HDR if vnet_hdr else 0)
        try:
            ifr = struct.pack("16sH22x", name.encode(), flags)
            result = fcntl.ioctl(fd, TUNSETIFF, ifr)
            if vnet_hdr:
                fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR_SIZE))
                offloads = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 if read_offload else 0
                fcntl.ioctl(fd, TUNSETOFFLOAD, offloads)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.EPERM:
                raise TunnelError(
                    f"cannot create TUN interface {name!r}: needs root (CAP_NET_ADMIN)"
                ) from exc
            raise TunnelError(f"cannot create TUN interface {name!r}: {exc.strerror}") from exc
        actual = result[:IFNAMSIZ].rstrip(b"\0").decode()
        return cls(fd, actual, vnet_hdr)

    def fileno(self) -> int:
        return self.fd

    def read_packets(self, batch: int = 64) -> list[bytes]:
        """Up to `batch` reads' worth of IP packets (super-packets already segmented); [] when none wait."""
        if sys.platform != "linux":  # also tells mypy --platform win32 to skip the rest
            raise TunnelError("TUN devices need Linux")
        packets: list[bytes] = []
        fd, buf, view, stats = self.fd, self._buf, self._view, self.stats
        if not self.vnet_hdr:
            read = os.read
            for _ in range(batch):
                try:
                    packets.append(read(fd, MAX_PACKET))
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
            stats.reads += len(packets)
            stats.packets_read += len(packets)
            return packets
        readv = os.readv
        for _ in range(batch):
            try:
                n = readv(fd, [buf])
            except BlockingIOError:
                break
            except InterruptedError:
                continue
            stats.reads += 1
            if n <= VNET_HDR_SIZE:
                stats.dropped_malformed += 1
                continue
            if buf[0] == 0 and buf[1] == 0:  # no checksum to finish, no segmentation: the common small case
                packets.append(bytes(view[VNET_HDR_SIZE:n]))
                continue
            try:
                pieces = offload_segments(view[:n])
            except ValueError:
                stats.dropped_malformed += 1
                continue
            if len(pieces) > 1:
                stats.super_packets += 1
            packets.extend(pieces)
        stats.packets_read += len(packets)
        return packets

    def write_packet(self, packet: bytes | bytearray | memoryview) -> None:
        """Hand one IP packet to the kernel. A full queue drops it, as a NIC would."""
        if sys.platform != "linux":  # also tells mypy --platform win32 to skip the rest
            raise TunnelError("TUN devices need Linux")
        try:
            if self.vnet_hdr:
                os.writev(self.fd, [_NO_VNET_HDR, packet])
            else:
                os.write(self.fd, packet)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            # EINVAL/EIO for a packet the kernel refuses (e.g. bad header): dropped, never raised.
            if exc.errno not in (errno.EINVAL, errno.EIO, errno.EFAULT, errno.EMSGSIZE):
                raise
            self.stats.dropped_malformed += 1
            return
        self.stats.writes += 1

    def write_packets(self, packets: list[bytes]) -> None:
        """Hand IP packets to the kernel; with a vnet header, consecutive segments of one TCP flow go
        as one super-packet (GRO done here: one write and one pass through the stack instead of many)."""
        if sys.platform != "linux":  # also tells mypy --platform win32 to skip the rest
            raise TunnelError("TUN devices need Linux")
        if not self.vnet_hdr:
            for packet in packets:
                self.write_packet(packet)
            return
        fd, stats = self.fd, self.stats
        writev = os.writev
        for buffers in coalesce_tcp_buffers(packets):
            try:
                writev(fd, buffers)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                if exc.errno not in (errno.EINVAL, errno.EIO, errno.EFAULT, errno.EMSGSIZE):
                    raise
                stats.dropped_malformed += 1
                continue
            stats.writes += 1

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# --- checksums and segmentation (pure functions) -----------------------------------------------------


def ones_complement_sum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """16-bit ones'-complement sum of `data` (big-endian words; odd length padded with a zero byte).

    Because 2**16 ≡ 1 (mod 0xFFFF), the sum of the 16-bit words of a big integer is the integer
    modulo 0xFFFF, so one `int.from_bytes` replaces a Python loop over the words.
    """
    if len(data) & 1:
        data = bytes(data) + b"\0"
    total = (int.from_bytes(data, "big") + initial) % 0xFFFF
    return total


def checksum(data: bytes | bytearray | memoryview, initial: int = 0) -> int:
    """Internet checksum (RFC 1071) of `data` plus a partial sum `initial`."""
    return ~ones_complement_sum(data, initial) & 0xFFFF


def _pseudo_header_sum(packet: memoryview, version: int, proto: int, length: int) -> int:
    addresses = packet[12:20] if version == 4 else packet[8:40]
    return ones_complement_sum(addresses, proto + length)


def offload_segments(frame: memoryview) -> list[bytes]:
    """IP packets from one vnet-header read: finish a partial checksum, or cut a TCP super-packet into
    `gso_size` segments, each with its own IP length/ID, TCP sequence number, flags and checksums.
    Raises ValueError on a header that does not describe the packet."""
    flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = VNET_HDR.unpack_from(frame)
    packet = frame[VNET_HDR_SIZE:]
    gso = gso_type & ~VIRTIO_NET_HDR_GSO_ECN
    if gso == VIRTIO_NET_HDR_GSO_NONE:
        if not flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            return [bytes(packet)]
        end = csum_start + csum_offset + 2
        if end > len(packet):
            raise ValueError("checksum offset beyond the packet")
        out = bytearray(packet)
        # The field already holds the pseudo-header sum: checksum the transport part with it in place.
        value = checksum(out[csum_start:])
        out[csum_start + csum_offset : end] = value.to_bytes(2, "big")
        return [bytes(out)]
    if gso not in (VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6) or gso_size == 0:
        raise ValueError(f"unsupported GSO type {gso_type}")
    return _segment_tcp(packet, gso_size)


def _segment_tcp(packet: memoryview, mss: int) -> list[bytes]:
    if len(packet) < 20:
        raise ValueError("short packet")
    version = packet[0] >> 4
    if version == 4:
        ip_len = (packet[0] & 0x0F) * 4
        if ip_len < 20 or packet[9] != 6:
            raise ValueError("not TCP over IPv4")
        ip_id = int.from_bytes(packet[4:6], "big")
    elif version == 6:
        ip_len = 40
        if packet[6] != 6:  # extension headers never come with TSO from the Linux stack
            raise ValueError("not TCP over IPv6")
        ip_id = 0
    else:
        raise ValueError("not an IP packet")
    if len(packet) < ip_len + 20:
        raise ValueError("short TCP header")
    tcp_len = (packet[ip_len + 12] >> 4) * 4
    headers = ip_len + tcp_len
    if tcp_len < 20 or len(packet) < headers:
        raise ValueError("bad TCP header length")
    seq = int.from_bytes(packet[ip_len + 4 : ip_len + 8], "big")
    tcp_flags = packet[ip_len + 13]
    header = bytearray(packet[:headers])
    payload = packet[headers:]
    total = len(payload)
    segments: list[bytes] = []
    offset = 0
    index = 0
    while offset < total or (total == 0 and index == 0):
        chunk = payload[offset : offset + mss]
        last = offset + mss >= total
        seg = bytearray(header)
        seg += chunk
        if version == 4:
            struct.pack_into("!HH", seg, 2, headers + len(chunk), (ip_id + index) & 0xFFFF)
            seg[10:12] = b"\0\0"
            seg[10:12] = checksum(seg[:ip_len]).to_bytes(2, "big")
        else:
            struct.pack_into("!H", seg, 4, tcp_len + len(chunk))
        struct.pack_into("!I", seg, ip_len + 4, (seq + offset) & 0xFFFFFFFF)
        flags = tcp_flags
        if not last:
            flags &= ~0x09  # FIN and PSH only on the last segment
        if index:
            flags &= ~0x80  # CWR only on the first
        seg[ip_len + 13] = flags
        seg[ip_len + 16 : ip_len + 18] = b"\0\0"
        pseudo = _pseudo_header_sum(memoryview(seg), version, 6, tcp_len + len(chunk))
        seg[ip_len + 16 : ip_len + 18] = checksum(memoryview(seg)[ip_len:], pseudo).to_bytes(2, "big")
        segments.append(bytes(seg))
        offset += mss
        index += 1
    return segments


IOV_MAX = 1024  # buffers per writev (Linux UIO_MAXIOV)
_MAX_RUN_PIECES = IOV_MAX - 2  # a run's payloads, with the vnet header and the first packet's headers


def _varying_mask(header_len: int, varying: tuple[tuple[int, int], ...]) -> int:
    """An all-ones mask over `header_len` bytes (big-endian) with the byte ranges in `varying` cleared."""
    mask = bytearray(b"\xff" * header_len)
    for start, end in varying:
        mask[start:end] = bytes(end - start)
    return int.from_bytes(mask, "big")


# Bytes of the IP and TCP headers that may differ between the segments of one GRO run: lengths, the IPv4
# ID and checksum, the TCP sequence number, flags and checksum. Every other header byte, TCP options
# included, must match (as Linux's tcp_gro_receive requires). Masks by header length (20 + TCP header).
_V4_VARYING = ((2, 6), (10, 12), (24, 28), (33, 34), (36, 38))
_V6_VARYING = ((4, 6), (44, 48), (53, 54), (56, 58))
_V4_MASKS = {20 + doff: _varying_mask(20 + doff, _V4_VARYING) for doff in range(20, 61, 4)}
_V6_MASKS = {40 + doff: _varying_mask(40 + doff, _V6_VARYING) for doff in range(20, 61, 4)}


def coalesce_tcp_buffers(packets: list[bytes]) -> list[list[bytes]]:
    """The buffers of one `writev` per entry (vnet header first) for `packets` in order, consecutive
    in-order segments of one TCP flow merged into a GSO super-packet (the Linux GRO rules: same headers,
    equal-size segments except a shorter last one, PSH ends a run, at most 64 KB). A merged packet's
    payloads stay separate buffers: the kernel gathers them, so they are never copied into one.

    Segments GRO may merge: IPv4 without options or fragments, IPv6 without extension headers; data,
    ACK, no other control flag. A segment's flow key is its headers with the per-segment fields masked
    out, as one integer. This runs per packet on the download path: the run being merged lives in local
    variables, not in an object."""
    out: list[list[bytes]] = []
    append = out.append
    v4_masks, v6_masks = _V4_MASKS, _V6_MASKS
    # The run being merged, when `pieces` is not None: the first segment's headers, then the payloads.
    pieces: list[bytes] | None = None
    run_key = run_ihl = run_mss = run_size = next_seq = last_flags = 0
    for packet in packets:
        n = len(packet)
        first = packet[0] if n else 0
        ihl = headers = flags = 0
        mask = None
        if first == 0x45:
            if n >= 40 and packet[9] == 6 and not packet[6] & 0x3F and not packet[7]:
                ihl = 20
                headers = 20 + (packet[32] >> 4) * 4
                mask = v4_masks.get(headers)
        elif first >> 4 == 6 and n >= 60 and packet[6] == 6:
            ihl = 40
            headers = 40 + (packet[52] >> 4) * 4
            mask = v6_masks.get(headers)
        if mask is not None:
            flags = packet[ihl + 13]
            if n <= headers or flags & ~0x18 or not flags & 0x10:
                mask = None
        if mask is None:
            if pieces is not None:
                append(_finish(pieces, run_ihl, run_size, run_mss, last_flags))
                pieces = None
            append([_NO_VNET_HDR, packet])
            continue
        value = int.from_bytes(packet[:headers], "big")
        key = value & mask
        seq = (value >> ((headers - ihl - 8) * 8)) & 0xFFFFFFFF
        payload_len = n - headers
        if pieces is not None:
            if (
                key == run_key
                and seq == next_seq
                and payload_len <= run_mss
                and run_size + payload_len <= MAX_PACKET
                and len(pieces) < _MAX_RUN_PIECES
            ):
                pieces.append(packet[headers:])
                run_size += payload_len
                next_seq = (seq + payload_len) & 0xFFFFFFFF
                last_flags = flags
                if payload_len < run_mss or flags & 0x08:
                    # A short segment or PSH ends the run, as in Linux GRO.
                    append(_finish(pieces, run_ihl, run_size, run_mss, last_flags))
                    pieces = None
                continue
            append(_finish(pieces, run_ihl, run_size, run_mss, last_flags))
        pieces = [packet[:headers], packet[headers:]]
        run_key, run_ihl, run_mss, run_size, last_flags = key, ihl, payload_len, n, flags
        next_seq = (seq + payload_len) & 0xFFFFFFFF
        if flags & 0x08:
            append(_finish(pieces, ihl, n, payload_len, flags))
            pieces = None
    if pieces is not None:
        append(_finish(pieces, run_ihl, run_size, run_mss, last_flags))
    return out


def coalesce_tcp(packets: list[bytes]) -> list[tuple[bytes, bytes]]:
    """(vnet header, packet) pairs for `packets`: `coalesce_tcp_buffers` with each packet in one piece."""
    return [(buffers[0], b"".join(buffers[1:])) for buffers in coalesce_tcp_buffers(packets)]


def _finish(pieces: list[bytes], ihl: int, size: int, mss: int, last_flags: int) -> list[bytes]:
    """The writev buffers for a run: [vnet header, IP + TCP headers, payloads...]; a run of one segment
    goes as it is, a longer one as a GSO super-packet with its lengths and checksum prepared."""
    if len(pieces) == 2:
        return [_NO_VNET_HDR, *pieces]
    header = bytearray(pieces[0])
    tcp_len = size - ihl
    if ihl == 20:
        struct.pack_into("!H", header, 2, size)
        header[10:12] = b"\0\0"
        header[10:12] = checksum(header[:20]).to_bytes(2, "big")
        gso_type = VIRTIO_NET_HDR_GSO_TCPV4
        addresses = header[12:20]
    else:
        struct.pack_into("!H", header, 4, tcp_len)
        gso_type = VIRTIO_NET_HDR_GSO_TCPV6
        addresses = header[8:40]
    header[ihl + 13] |= last_flags & 0x08
    # CHECKSUM_PARTIAL: the field holds the folded pseudo-header sum; the kernel finishes per segment.
    header[ihl + 16 : ihl + 18] = ones_complement_sum(addresses, 6 + tcp_len).to_bytes(2, "big")
    vnet = VNET_HDR.pack(VIRTIO_NET_HDR_F_NEEDS_CSUM, gso_type, len(header), mss, ihl, 16)
    return [vnet, bytes(header), *pieces[1:]]


# --- interface configuration through iproute2 ------------------------------------------------------


def ip_command(*args: str) -> None:
    """Run `ip ARGS`; a failure becomes a TunnelError carrying ip's own message."""
    exe = shutil.which("ip")
    if exe is None:
        raise TunnelError("the 'ip' command (iproute2) is not installed")
    proc = subprocess.run([exe, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip() or f"exit code {proc.returncode}"
        raise TunnelError(f"ip {' '.join(args)}: {message}")


def set_link(name: str, *, mtu: int, up: bool = True) -> None:
    ip_command("link", "set", "dev", name, "mtu", str(mtu), "up" if up else "down")


def add_address(name: str, address: Interface) -> None:
    ip_command("-4" if address.version == 4 else "-6", "address", "add", str(address), "dev", name)


def add_route(name: str, network: Network, *, table: str | None = None) -> None:
    args = ["-4" if network.version == 4 else "-6", "route", "add", str(network), "dev", name]
    if table is not None:
        args += ["table", table]
    ip_command(*args)


def delete_route(name: str, network: Network, *, table: str | None = None) -> None:
    args = ["-4" if network.version == 4 else "-6", "route", "del", str(network), "dev", name]
    if table is not None:
        args += ["table", table]
    ip_command(*args)


def delete_link(name: str) -> None:
    ip_command("link", "delete", "dev", name)
