// A client address's limit key, as the Python side derives it (convex_guard.core.clientip's
// `ip_key`): the backfill migration gives old bot events the key the current code would have
// written, so their history counts in the per-client escalation.

/** The IPv6 network one subscriber usually holds (the Python side's default `ipv6_prefix`). */
export const DEFAULT_IPV6_PREFIX = 64;

const OCTET = "(?:25[0-5]|2[0-4]\\d|1\\d\\d|[1-9]?\\d)";
/** Dotted quad, no leading zeros (Python's `ipaddress` refuses them as ambiguous octal). */
const IPV4 = new RegExp(`^${OCTET}(?:\\.${OCTET}){3}$`);
const HEXTET = /^[0-9a-fA-F]{1,4}$/;
const MAPPED_PREFIX = 0xffffn; // ::ffff:a.b.c.d, seen on dual-stack sockets

function ipv4Value(text: string): bigint | undefined {
  if (!IPV4.test(text)) return undefined;
  return text.split(".").reduce((acc, octet) => (acc << 8n) | BigInt(Number(octet)), 0n);
}

function ipv4Text(value: bigint): string {
  return [24n, 16n, 8n, 0n].map((shift) => String((value >> shift) & 0xffn)).join(".");
}

/** The 128-bit value of an IPv6 address (a zone is dropped), or undefined if it is not one. */
function ipv6Value(address: string): bigint | undefined {
  let text = address;
  const zone = text.indexOf("%");
  if (zone !== -1) {
    if (zone === text.length - 1) return undefined;
    text = text.slice(0, zone);
  }
  const halves = text.split("::");
  if (halves.length > 2) return undefined;
  const groups = halves.map((half) => (half === "" ? [] : half.split(":")));
  // An IPv4 tail ("::ffff:1.2.3.4") stands for the last two hextets.
  const last = groups[groups.length - 1];
  let tail: bigint | undefined;
  if (last.length > 0 && last[last.length - 1].includes(".")) {
    tail = ipv4Value(last.pop()!);
    if (tail === undefined) return undefined;
  }
  const hextets: bigint[][] = [];
  for (const group of groups) {
    if (!group.every((h) => HEXTET.test(h))) return undefined;
    hextets.push(group.map((h) => BigInt(parseInt(h, 16))));
  }
  if (tail !== undefined) hextets[hextets.length - 1].push(tail >> 16n, tail & 0xffffn);
  const given = hextets.reduce((n, group) => n + group.length, 0);
  // "::" stands for at least one hextet; without it there must be all eight.
  const missing = 8 - given;
  if (halves.length === 2 ? missing < 1 : missing !== 0) return undefined;
  const all = halves.length === 2 ? [...hextets[0], ...Array(missing).fill(0n), ...hextets[1]] : hextets[0];
  return all.reduce((acc, h) => (acc << 16n) | h, 0n);
}

/** RFC 5952 text, as Python writes it: the first longest run of two or more zeros is "::". */
function ipv6Text(value: bigint): string {
  const hextets = Array.from({ length: 8 }, (_, i) => Number((value >> BigInt(112 - 16 * i)) & 0xffffn));
  let bestStart = -1;
  let bestLength = 1;
  for (let i = 0; i < 8; ) {
    if (hextets[i] !== 0) {
      i++;
      continue;
    }
    let j = i;
    while (j < 8 && hextets[j] === 0) j++;
    if (j - i > bestLength) [bestStart, bestLength] = [i, j - i];
    i = j;
  }
  const hex = (part: number[]) => part.map((h) => h.toString(16)).join(":");
  if (bestStart === -1) return hex(hextets);
  return `${hex(hextets.slice(0, bestStart))}::${hex(hextets.slice(bestStart + bestLength))}`;
}

/**
 * The limit key of a bot event's `ip`: IPv4 as is (an IPv4-mapped IPv6 address as the IPv4
 * address it is), IPv6 as its `/ipv6Prefix` network ("2001:db8:1:2::/64"). An `ip` that is a
 * network already is kept: without a fingerprint middleware the address recorded is the key.
 * Undefined for what is no address ("unknown"): such events get no key, as new ones do not.
 */
export function clientKeyOf(ip: string, ipv6Prefix: number = DEFAULT_IPV6_PREFIX): string | undefined {
  const slash = ip.indexOf("/");
  if (slash !== -1) {
    const bits = ip.slice(slash + 1);
    const network = ipv6Value(ip.slice(0, slash));
    return network !== undefined && /^\d{1,3}$/.test(bits) && Number(bits) <= 128 ? ip : undefined;
  }
  if (ipv4Value(ip) !== undefined) return ip;
  const value = ipv6Value(ip);
  if (value === undefined) return undefined;
  if (value >> 32n === MAPPED_PREFIX) return ipv4Text(value & 0xffffffffn);
  if (ipv6Prefix === 128) return ipv6Text(value);
  const shift = BigInt(128 - ipv6Prefix);
  return `${ipv6Text((value >> shift) << shift)}/${ipv6Prefix}`;
}
