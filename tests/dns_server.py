"""A loopback DNS server for the reverse-DNS tests: PTR, A and AAAA answers from a dict, names
it never answers (to test timeouts), and a count of the questions it got."""

from __future__ import annotations

import socket
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import dns.message
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset


class LoopbackDns:
    """`records`: (name, type) → answers, e.g. `("1.66.249.66.in-addr.arpa.", "PTR") →
    ["crawl.googlebot.com."]`; a name in `silent` gets no reply at all."""

    def __init__(self) -> None:
        self.records: dict[tuple[str, str], list[str]] = {}
        self.silent: set[str] = set()
        self.questions: Counter[tuple[str, str]] = Counter()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.settimeout(0.2)
        self.address = f"127.0.0.1:{self._sock.getsockname()[1]}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def add(self, name: str, rdtype: str, *answers: str) -> None:
        self.records[(name.lower().rstrip(".") + ".", rdtype)] = list(answers)

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                data, peer = self._sock.recvfrom(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            query = dns.message.from_wire(data)
            question = query.question[0]
            name = question.name.to_text().lower()
            rdtype = dns.rdatatype.to_text(question.rdtype)
            self.questions[(name, rdtype)] += 1
            if name in self.silent:
                continue
            reply = dns.message.make_response(query)
            answers = self.records.get((name, rdtype))
            if answers is None:
                known = any(key[0] == name for key in self.records)
                if not known:
                    reply.set_rcode(dns.rcode.NXDOMAIN)
            else:
                reply.answer.append(
                    dns.rrset.from_text_list(name, 60, dns.rdataclass.IN, rdtype, answers)
                )
            self._sock.sendto(reply.to_wire(), peer)

    def asked(self, name: str) -> int:
        name = name.lower().rstrip(".") + "."
        return sum(n for (q, _), n in self.questions.items() if q == name)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close()


@contextmanager
def loopback_dns() -> Iterator[LoopbackDns]:
    server = LoopbackDns()
    server.start()
    try:
        yield server
    finally:
        server.stop()
