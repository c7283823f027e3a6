"""Rate limiting: every rule matching a request is decided in one atomic store call."""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, cast

from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Receive, Scope

from convex_guard.core.errors import ConfigurationError
from convex_guard.core.estimates import DEFAULT_ESTIMATE
from convex_guard.core.limits import LimitResult
from convex_guard.core.logs import ThrottledLog, logger, printable
from convex_guard.core.problem import (
    QUOTA_TITLE,
    budget_exceeded,
    problem,
    quota_exceeded,
    retry_after,
    unavailable,
)
from convex_guard.middleware.body import BodyTooLarge, read_body
from convex_guard.middleware.context import (
    GuardContext,
    PendingBot,
    Reservation,
    Route,
    current_context,
    guard_context,
    remember,
    route_of,
)
from convex_guard.middleware.logwriter import LogWriter
from convex_guard.middleware.order import API_KEYS, FINGERPRINT, RATE_LIMIT, missing_outside
from convex_guard.middleware.rules import (
    RateLimitItems,
    Rule,
    closest_to_exhaustion,
    ip_key,
    policy_item,
    ratelimit_field,
    ratelimit_template,
    user_key,
)
from convex_guard.middleware.steps import Before, Refusal, StepMiddleware
from convex_guard.stores.base import (
    CheckResult,
    LimitRequest,
    LimitStore,
    LogStore,
    Settlement,
    require,
)
from convex_guard.stores.memory import LimitPlan, LimitSpec, MemoryStore
from convex_guard.stores.resilient import answers_checked, checked_answer

DEFAULT_TIMEOUT = 0.5


class RateLimitMiddleware(StepMiddleware):
    """Decide all matching `rules` together: all pass and are consumed, or none is consumed.

    A denied request gets 429 with `Retry-After`, the IETF `RateLimit-Policy`/`RateLimit`
    fields and a problem+json body naming the violated policies; an admitted one on a limited
    route carries the two fields. A store error, an answer of the wrong shape or a call slower
    than `timeout` seconds follows each matching rule's fail policy: closed answers 503, open
    lets the request through. A `ResilientStore` bounds its calls itself (and falls back to
    this process), so no second timer is put around it.

    A bot check that `BotDetectionMiddleware(defer=True)` left in the guard context is decided
    in the same store call, so a request costs one round trip whatever it triggers.

    Token and cost rules (`Rule(unit="tokens" | "cost")`) reserve an estimate on arrival, in
    the same store call: the body is read first (at most the rule's `max_body` bytes, 413
    beyond; the app reads the same bytes), and a request whose estimate exceeds what the
    limit can ever hold is a 413 at once. A spent budget is a 429 of type `budget-exceeded`.
    When the request ends the reservation is settled on the usage the app reported
    (`report_usage`): the difference is charged or refunded. A request that reported nothing
    keeps its reservation if it succeeded; if it failed (it raised, its client went away, its
    status was 400 or more, or a step after this one refused it) the reservation comes back
    whole. Settlements ride in the log writer's batches (`writer`, by default the store's
    shared one; the store must then be a `LogStore`): no store call of their own.

    `ratelimit_items="closest"` puts only the policy with the least quota remaining in an
    admitted request's two fields (the draft allows a single item, as express-rate-limit
    sends): fewer bytes on every response, which a server validates byte by byte. The
    default, `"all"`, lists every policy that applied.

    Each route's rules are compiled once, on its first request, into a plan (`_Plan`): which
    rules, which key each takes, the route's fields, and the store entries their states live
    in. With a `MemoryStore` a route whose rules count a constant and are keyed by kind (no
    function of the request) is decided by one synchronous call of the store's decision core
    (`MemoryStore.decide_planned`, `decide_all` with the plan's entries found once), which
    answers flat numbers, the `RateLimit` field's among them: an admitted request makes no
    request, result or coroutine object per rule. Token and cost rules with the built-in
    estimates (no tier) are planned too: the body is read and estimated as on the general
    path, then decided by one call of `MemoryStore.decide_all`. Everything else takes the
    general path through `store.check`: another store (it awaits I/O and may time out), a
    deferred bot check, a key, count or estimate function (it may raise, and its rule's fail
    policy answers), a key's own tier. A refused request, rare and already slow, is answered
    by the general path's code from the fast path's decision.
    """

    marker = RATE_LIMIT
    #: Set (to `_settle`) only when a rule has reservations to settle: then this step is a
    #: `FinishingStep`, and otherwise nothing runs for it after the app.
    after: Callable[[Scope, GuardContext, BaseException | None], None]

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: LimitStore,
        rules: Sequence[Rule],
        timeout: float = DEFAULT_TIMEOUT,
        writer: LogWriter | None = None,
        ratelimit_items: RateLimitItems = "all",
    ) -> None:
        if not rules:
            raise ConfigurationError("RateLimitMiddleware needs at least one rule")
        names = [rule.name for rule in rules]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"Rule names must be unique: {names}")
        if not 0 < timeout < math.inf:
            raise ConfigurationError("timeout must be a positive number of seconds")
        if ratelimit_items not in ("all", "closest"):
            raise ConfigurationError("ratelimit_items must be 'all' or 'closest'")
        require(store, (LimitStore,), "RateLimitMiddleware")
        settled = [rule.name for rule in rules if rule.settled]
        self.writer: LogWriter | None = None
        if settled:
            if writer is None:
                require(
                    store,
                    {LogStore: f"the settlements of {', '.join(settled)}"},
                    "RateLimitMiddleware",
                )
                writer = LogWriter.for_store(cast(LogStore, store))
            self.writer = writer
            # A finishing step only with rules to settle: a route limited by requests alone
            # costs no call after the app.
            self.after = self._settle
        super().__init__(app)
        self.store = store
        self.rules = tuple(rules)
        self.timeout = timeout
        # A MemoryStore never waits and a ResilientStore owns the timeout; both answer in the
        # right shape. Any other store gets a timer and its answers checked.
        self._bounded = not answers_checked(store)
        # A MemoryStore's decision core is called directly (see the class docstring).
        self._memory = store if type(store) is MemoryStore else None
        self._store_trouble = ThrottledLog()
        # Which rules match a (method, path): the same few routes come back on every request.
        self._matches: dict[tuple[str, str], _Matched] = {}
        # Each rule's two fields alone, for `ratelimit_items="closest"`.
        self._single: dict[str, tuple[bytes, bytes]] | None = (
            {rule.name: _fields((rule,))[1:] for rule in rules}
            if ratelimit_items == "closest"
            else None
        )

    def context(self, scope: Scope) -> GuardContext | None:
        """The guard context, none made (the request goes to the app) when no rule matches."""
        ctx = current_context(scope)
        if ctx is None:
            route = route_of(scope)
            if not self._matching(route).rules:
                return None
            ctx = guard_context(scope, route)
        return ctx

    def writers(self) -> tuple[LogWriter, ...]:
        return () if self.writer is None else (self.writer,)

    def _matching(self, route: Route) -> _Matched:
        """The rules matching the request's (method, path), cached: the same routes come back."""
        matched = self._matches.get(route)
        if matched is None:
            method, path = route
            matched = _Matched(
                tuple(rule for rule in self.rules if rule.matches(path, method)),
                self._memory is not None,
                self._single,
            )
            remember(self._matches, route, matched)
        return matched

    def before(self, scope: Scope, receive: Receive, ctx: GuardContext) -> Before:
        """What the request asks of the store: None when nothing, else the decision to await.

        A deferred bot check (`ctx.pending_bot`) is decided in the same store call.
        """
        route = ctx.route
        matched = self._matches.get(route) or self._matching(route)  # a known route: no call
        pending = ctx.pending_bot
        if pending is None:
            plan = matched.plan
            if plan is not None:
                if plan.reserving:
                    return self._reserve_now(scope, receive, ctx, matched, plan)
                return self._decide_now(scope, ctx, matched, plan)
            if not matched.rules:
                return None

        rules: Sequence[Rule]
        limits: Sequence[LimitRequest]
        fixed = matched.fixed
        if fixed is not None:
            rules, limits = matched.rules, fixed
        elif matched.max_body:
            return self._estimated(scope, receive, ctx, matched, pending)
        else:
            rules, limits, refusal = self._wanted(scope, receive, ctx, matched)
            if refusal is not None:
                return refusal
        if not rules and pending is None:
            return None
        return self._decide(scope, ctx, matched, rules, limits, pending)

    def _decide_now(
        self, scope: Scope, ctx: GuardContext, matched: _Matched, plan: _Plan
    ) -> Before:
        """The fast path (see the class docstring): the route's keys, one call of the
        MemoryStore's decision core, and the two fields from its flat numbers."""
        plan, values = _applying(scope, ctx, matched, plan)
        if not plan.specs:
            return None
        memory = self._memory
        assert memory is not None  # a plan is made only for a MemoryStore
        try:
            ok, decisions, numbers, now = memory.decide_planned(plan.limits, values)
        except Exception:
            # Decided again by the general path, which answers by the rules' fail policies.
            return self._decide(scope, ctx, matched, plan.rules, plan.requests(values), None)
        if not ok:
            outcome = CheckResult(False, tuple([LimitResult(*d) for d in decisions]), None, now)
            return self._answer(scope, ctx, matched, plan.rules, plan.requests(values), outcome)
        ctx.decide(plan.names, decisions)
        single = plan.single
        if single is None:
            _announce(ctx, plan.policy, plan.template % tuple(numbers))
        else:
            at = closest_to_exhaustion(decisions)
            policy, template = single[at]
            _announce(ctx, policy, template % (numbers[2 * at], numbers[2 * at + 1]))
        return None

    async def _reserve_now(
        self, scope: Scope, receive: Receive, ctx: GuardContext, matched: _Matched, plan: _Plan
    ) -> Refusal | None:
        """The fast path of a route with token or cost rules whose estimates are the
        built-in ones (`_Plan.reserving`): the body read and estimated as the general path
        does, then one call of the MemoryStore's decision core, the reservations and the two
        fields made from its flat answer. Anything else it answers by the general path."""
        body, payload, refusal = await _read_payload(scope, receive, ctx, matched)
        if refusal is not None:
            return refusal
        plan, values = _applying(scope, ctx, matched, plan)
        if not plan.specs:
            return None
        keys = plan.limits.keys(values)
        model = payload.get("model") if isinstance(payload, dict) else None
        model = model if isinstance(model, str) else None
        specs: list[LimitSpec] = []
        for rule, spec in zip(plan.rules, plan.specs, strict=True):
            if rule.settled:
                # As `_reservation` does, without a key (known) or a tier (not planned).
                try:
                    amount = rule.estimated(_no_request, payload, body)
                except Exception:  # the general path logs it and answers by the fail policy
                    return await self._estimated(scope, receive, ctx, matched, None)
                if not rule.fits(amount):
                    return self._never_fits(ctx, rule, amount)
                spec = (spec[0], spec[1], amount, False)
            specs.append(spec)
        memory = self._memory
        assert memory is not None  # a plan is made only for a MemoryStore
        try:
            ok, decisions, now = memory.decide_all(specs, keys)
        except Exception:
            # Decided again by the general path, which answers by the rules' fail policies.
            requests = _reservations_asked(plan.rules, specs, keys)
            return await self._decide(scope, ctx, matched, plan.rules, requests, None, True, model)
        if not ok:
            outcome = CheckResult(False, tuple([LimitResult(*d) for d in decisions]), None, now)
            requests = _reservations_asked(plan.rules, specs, keys)
            return await self._answer(
                scope, ctx, matched, plan.rules, requests, outcome, None, True, model
            )
        if plan.reserving:  # (an anonymous caller may have none of them apply)
            ctx.reservations = [
                Reservation(rule, name, config, key, count, now, model)
                for rule, (name, config, count, _), key in zip(plan.rules, specs, keys, strict=True)
                if rule.settled
            ]
        ctx.decide(plan.names, decisions)
        single = plan.single
        if single is None:
            _announce(ctx, plan.policy, ratelimit_field(plan.template, decisions))
        else:
            at = closest_to_exhaustion(decisions)
            policy, template = single[at]
            _announce(ctx, policy, ratelimit_field(template, [decisions[at]]))
        return None

    async def _estimated(
        self,
        scope: Scope,
        receive: Receive,
        ctx: GuardContext,
        matched: _Matched,
        pending: PendingBot | None,
    ) -> Refusal | None:
        """A route with token or cost rules: read the body, estimate, decide and reserve."""
        body, payload, refusal = await _read_payload(scope, receive, ctx, matched)
        if refusal is not None:
            return refusal
        rules, limits, refusal = self._wanted_estimated(scope, receive, ctx, matched, payload, body)
        if refusal is not None:
            return refusal
        if not rules and pending is None:
            return None
        model = payload.get("model") if isinstance(payload, dict) else None
        return await self._decide(
            scope,
            ctx,
            matched,
            rules,
            limits,
            pending,
            True,
            model if isinstance(model, str) else None,
        )

    async def _decide(
        self,
        scope: Scope,
        ctx: GuardContext,
        matched: _Matched,
        rules: Sequence[Rule],
        limits: Sequence[LimitRequest],
        pending: PendingBot | None,
        # Positional defaults: a keyword-only one costs a dict lookup on every call.
        estimated: bool = False,
        model: str | None = None,
    ) -> Refusal | None:
        """Decide the limits (and the deferred bot check) in one store call: the refusal, or
        None with the `RateLimit-Policy`/`RateLimit` fields in `ctx.response_headers` (and
        the reservations of token and cost rules in `ctx.reservations`)."""
        try:
            bot = pending.check if pending is not None else None
            if self._bounded:
                async with asyncio.timeout(self.timeout):
                    answered = await self.store.check(limits, bot=bot)
                outcome = checked_answer(answered, len(limits), bot is not None)
            else:
                outcome = await self.store.check(limits, bot=bot)
        except ConfigurationError as exc:
            # Only a cost function can get here (constant costs are checked at start-up):
            # a request costing more than a limit can ever hold is never admitted.
            logger.warning("Rate limit: request cost refused: %s", exc)
            if all(rule.shadow for rule in rules):
                ctx.shadow = "rate_limited:cost"
                return None
            ctx.rejected = "rate_limited:cost"
            return quota_exceeded(
                "Request cost exceeds what the quota can ever admit",
                [rule.name for rule in rules],
            )
        except Exception as exc:
            self._store_trouble.warning(
                "Rate-limit store unavailable (%s): %r", printable(scope["path"]), exc
            )
            if pending is not None:
                # The bot middleware's own fail policy, as when it asks the store itself.
                refusal = pending.respond(None)
                if refusal is not None:
                    return refusal
            if any(rule.fail == "closed" for rule in rules):
                return self._unavailable(ctx)
            return None
        return await self._answer(
            scope, ctx, matched, rules, limits, outcome, pending, estimated, model
        )

    async def _answer(
        self,
        scope: Scope,
        ctx: GuardContext,
        matched: _Matched,
        rules: Sequence[Rule],
        limits: Sequence[LimitRequest],
        outcome: CheckResult,
        pending: PendingBot | None = None,
        estimated: bool = False,
        model: str | None = None,
    ) -> Refusal | None:
        """What the store decided, answered: the bot's verdict, the 429 (or a shadow rule's
        second call), the reservations, and the fields of an admitted request."""
        if pending is not None and outcome.bot is not None:
            answer = pending.respond(outcome.bot)
            if answer is not None:
                return answer
        if not rules:
            return None
        results = outcome.results
        limits_seen = ctx.limits
        for rule, result in zip(rules, results):  # noqa: B905 (`checked_answer` checks lengths)
            limits_seen[rule.name] = result
        # The route's fields, computed once for all its rules and once per subset of them
        # (an anonymous caller skips the per-user rule on every request).
        policy, policy_bytes, template = (
            matched.fields if rules is matched.rules else matched.subset(rules)
        )
        if (
            estimated
            and matched.tiers
            and any(
                limit.config is not rule.config for rule, limit in zip(rules, limits, strict=True)
            )
        ):
            # A key's own tier: its quotas, not the rules', in this response's policy.
            policy = ", ".join(
                [
                    policy_item(rule.name, limit.config, rule.unit)
                    for rule, limit in zip(rules, limits, strict=True)
                ]
            )
            policy_bytes = policy.encode("latin-1")
        if not outcome.ok:
            checked = await self._shadowed(scope, ctx, rules, limits, results, policy)
            if checked is None or not isinstance(checked, tuple):
                return checked
            results = checked
            for rule, result in zip(rules, results):  # noqa: B905 (as above)
                limits_seen[rule.name] = result
        if estimated:
            reserved_at = outcome.now
            if reserved_at is None:  # a store that does not say: this process's clock
                reserved_at = time.time() * 1000.0
            # Only what was taken: a shadow rule that refused consumed nothing to give back.
            held = [
                Reservation(
                    rule,
                    limit.name,
                    limit.config,
                    limit.key,
                    limit.count,
                    reserved_at,
                    model,
                )
                for rule, limit, result in zip(rules, limits, results, strict=True)
                if limit.settled and result.ok
            ]
            if held:
                ctx.reservations = held
        decisions = [result.decision for result in results]
        single = self._single
        if single is not None:
            at = closest_to_exhaustion(decisions)
            policy_bytes, template = single[rules[at].name]
            decisions = [decisions[at]]
        _announce(ctx, policy_bytes, ratelimit_field(template, decisions))
        return None

    async def _shadowed(
        self,
        scope: Scope,
        ctx: GuardContext,
        rules: Sequence[Rule],
        limits: Sequence[LimitRequest],
        results: Sequence[LimitResult],
        policy: str,
    ) -> Refusal | tuple[LimitResult, ...] | None:
        """A denied check: the 429 when an enforced rule refused, else (only shadow rules, or
        a bot check in shadow mode, refused) the results to answer with, once the limits that
        admitted the request are consumed in a second store call, as if what refused in
        shadow were not there (None: that call failed open, no fields). The shadow rules'
        refusal goes to `ctx.shadow` either way."""
        final: list[LimitResult] | None = None
        if len(results) != len(rules):
            # The bot's verdict (in shadow mode) stopped the store before any limit.
            admitted = list(range(len(rules)))
        else:
            violated = [
                (rule, result) for rule, result in zip(rules, results, strict=True) if not result.ok
            ]
            shadowed = [rule for rule, _ in violated if rule.shadow]
            if shadowed:
                note = _refused_note(shadowed)
                # After a bot verdict in shadow mode, which stays first (its reason counts).
                ctx.shadow = note if ctx.shadow is None else f"{ctx.shadow} {note}"
            enforced = [(rule, result) for rule, result in violated if not rule.shadow]
            if enforced:
                return self._refusal(ctx, enforced, policy)
            admitted = [i for i, result in enumerate(results) if result.ok]
            final = list(results)
            if not admitted:
                return tuple(final)
        try:
            wanted = [limits[i] for i in admitted]
            if self._bounded:
                async with asyncio.timeout(self.timeout):
                    answered = await self.store.check(wanted)
                again = checked_answer(answered, len(wanted), False)
            else:
                again = await self.store.check(wanted)
        except Exception as exc:
            self._store_trouble.warning(
                "Rate-limit store unavailable (%s): %r", printable(scope["path"]), exc
            )
            if any(rules[i].fail == "closed" for i in admitted):
                return self._unavailable(ctx)
            return None if final is None else tuple(final)
        if final is None:
            final = list(again.results)
        else:
            for i, result in zip(admitted, again.results):  # noqa: B905 (checked lengths)
                final[i] = result
        if not again.ok:  # another request took the last tokens in between
            return await self._shadowed(scope, ctx, rules, limits, final, policy)
        return tuple(final)

    def _refusal(
        self, ctx: GuardContext, violated: Sequence[tuple[Rule, LimitResult]], policy: str
    ) -> Refusal:
        """The 429 naming the enforced rules that refused (`policy`: the route's field)."""
        retry_ms = max(result.retry_after or 0.0 for _, result in violated)
        retry = retry_after(retry_ms)
        names = [rule.name for rule, _ in violated]
        headers = [
            ("RateLimit-Policy", policy),
            (
                "RateLimit",
                ratelimit_field(
                    ratelimit_template(names), [result.decision for _, result in violated]
                ).decode("latin-1"),
            ),
        ]
        ctx.rejected = _refused_note([rule for rule, _ in violated])
        if any(rule.unit == "cost" for rule, _ in violated):
            return budget_exceeded(
                names,
                retry=retry,
                detail=f"Budget spent for {', '.join(names)}; retry after {retry} s.",
                headers=headers,
            )
        return quota_exceeded(
            QUOTA_TITLE,
            names,
            retry=retry,
            detail=f"Quota exceeded for {', '.join(names)}; retry after {retry} s.",
            headers=headers,
        )

    def _settle(self, scope: Scope, ctx: GuardContext, raised: BaseException | None) -> None:
        """The request is over: charge or refund each reservation (see the class docstring)."""
        held: list[Reservation] | None = getattr(ctx, "reservations", None)
        if not held:
            return
        ctx.reservations = []
        writer = self.writer
        assert writer is not None  # set whenever a rule reserves
        usage = ctx.usage
        status = ctx.status
        failed = raised is not None or ctx.rejected is not None or not 0 < status < 400
        # A stream cut off before its usage event counted its completion alone: the prompt's
        # estimate, from the body read on arrival, is worked out only then.
        prompt = 0.0
        if usage is not None and usage.completion_only:
            prompt = _prompt_estimate(ctx.body or b"")
        for reservation in held:
            rule = reservation.rule
            used = rule.used(usage, reservation.model, prompt)
            if used is None:
                if not failed:
                    continue  # nothing reported: the estimate stands as the charge
                amount = -reservation.amount
            else:
                amount = used - reservation.amount
            if amount:
                writer.add(
                    Settlement(
                        reservation.name,
                        reservation.config,
                        reservation.key,
                        amount,
                        reservation.reserved_at,
                    )
                )

    def _wanted(
        self, scope: Scope, receive: Receive, ctx: GuardContext, matched: _Matched
    ) -> tuple[Sequence[Rule], list[LimitRequest], ASGIApp | None]:
        """The rules that apply to this request and what each asks of the store."""
        get_request = _lazy_request(scope, receive) if matched.needs_request else _no_request

        rules: list[Rule] = []
        limits: list[LimitRequest] = []
        for rule in matched.rules:
            try:
                wanted = rule.limit_request(scope, ctx, get_request)
            except Exception:
                # A bug in the app's key or cost function: its fail policy decides.
                logger.exception("Rate-limit rule %r: key or cost function failed", rule.name)
                if rule.fail == "closed":
                    return rules, limits, self._unavailable(ctx)
                continue
            if wanted is not None:
                rules.append(rule)
                limits.append(wanted)
        # All applied (the common case): the matched tuple itself, whose policy is cached.
        applied = matched.rules
        return (applied if len(rules) == len(applied) else rules), limits, None

    def _wanted_estimated(
        self,
        scope: Scope,
        receive: Receive,
        ctx: GuardContext,
        matched: _Matched,
        payload: Any,
        body: bytes,
    ) -> tuple[Sequence[Rule], list[LimitRequest], ASGIApp | None]:
        """`_wanted` for a route with token or cost rules: theirs are estimates (kept apart so
        that a route limited by requests alone asks nothing more of each rule)."""
        get_request = (
            _lazy_request(scope, ctx.receive or receive) if matched.needs_request else _no_request
        )
        rules: list[Rule] = []
        limits: list[LimitRequest] = []
        for rule in matched.rules:
            try:
                if rule.settled:
                    wanted = self._reservation(scope, ctx, rule, get_request, payload, body)
                    if isinstance(wanted, float):
                        return rules, limits, self._never_fits(ctx, rule, wanted)
                else:
                    wanted = rule.limit_request(scope, ctx, get_request)
            except Exception:
                # A bug in the app's key, cost or estimate function: its fail policy decides.
                logger.exception("Rate-limit rule %r: key, cost or estimate failed", rule.name)
                if rule.fail == "closed":
                    return rules, limits, self._unavailable(ctx)
                continue
            if wanted is not None:
                rules.append(rule)
                limits.append(wanted)
        applied = matched.rules
        return (applied if len(rules) == len(applied) else rules), limits, None

    @staticmethod
    def _reservation(
        scope: Scope,
        ctx: GuardContext,
        rule: Rule,
        get_request: Callable[[], Request],
        payload: Any,
        body: bytes,
    ) -> LimitRequest | float | None:
        """What a token or cost rule reserves (None: the rule does not apply), or the
        estimate alone when it could never fit."""
        applies, key = rule.resolve_key(scope, ctx, get_request)
        if not applies:
            return None
        name, config = rule.name, rule.config
        if rule.tier:
            own = rule.tier_limit(getattr(ctx, "api_key_quotas", ()))
            if own is not None:
                name, config = own
        amount = rule.estimated(get_request, payload, body)
        if not rule.fits(amount, config):
            return amount
        return LimitRequest(name, config, key, amount, False, True)

    @staticmethod
    def _never_fits(ctx: GuardContext, rule: Rule, amount: float) -> ASGIApp:
        ctx.rejected = "rate_limited:estimate"
        own = rule.tier_limit(getattr(ctx, "api_key_quotas", ()))
        config = rule.config if own is None else own[1]
        what = "tokens" if rule.unit == "tokens" else "of cost"
        logger.info("Rate limit %r: estimate %g over what it can ever admit", rule.name, amount)
        return problem(
            413,
            "Request exceeds what the limit can ever admit",
            detail=(
                f"This request is estimated at {amount:g} {what}; {rule.name} admits at most "
                f"{config.max:g} per window. Ask for fewer (a lower max_tokens)."
            ),
            extra={"violated-policies": [rule.name]},
        )

    def order_problem(self, outside: list[str]) -> str | None:
        """Rules keyed by what an outer middleware fills need that middleware outside."""
        for kind, needs in (("api_key", API_KEYS), ("fingerprint", FINGERPRINT)):
            names = [rule.name for rule in self.rules if rule.key == kind]
            if names:
                problem = missing_outside(
                    outside, RATE_LIMIT, needs, f"has {kind!r} rules ({', '.join(names)})"
                )
                if problem is not None:
                    return problem
        return None

    def _unavailable(self, ctx: GuardContext) -> ASGIApp:
        ctx.rejected = "rate_limit_unavailable"
        return unavailable(
            "Rate limiting is unavailable",
            "The rate-limit store did not answer in time; try again shortly.",
        )


#: A set of rules' `RateLimit-Policy` field, as text and bytes, and its `RateLimit` template.
_Fields = tuple[str, bytes, bytes]


#: Where `_applying` finds each kind of rule's key, by the rule's `key`.
_SLOTS = {"global": 0, "ip": 1, "user": 2, "api_key": 3, "fingerprint": 4}
#: Each rule's fields alone, by name (`ratelimit_items="closest"`).
_Single = dict[str, tuple[bytes, bytes]]


class _Plan:
    """One decision of a set of rules by the fast path, compiled once: what each asks of the
    store (`specs`), where its key comes from (`slots`, into `_applying`'s values) and the
    fields they answer with."""

    __slots__ = (
        "limits",
        "names",
        "policy",
        "reserving",
        "rules",
        "single",
        "slots",
        "specs",
        "template",
    )

    def __init__(self, rules: tuple[Rule, ...], single: _Single | None) -> None:
        self.rules = rules
        self.names = tuple([rule.name for rule in rules])
        # A plan is made only for constant counts and keys by kind (see `_Matched`).
        self.specs: tuple[LimitSpec, ...] = tuple(
            [(rule.name, rule.config, cast(float, rule.count), False) for rule in rules]
        )
        self.slots = tuple([_SLOTS[cast(str, rule.key)] for rule in rules])
        #: The specs with the store's entries they resolve to, each keyed by its slot of
        #: `_applying`'s values (`MemoryStore.decide_planned`).
        self.limits = LimitPlan(self.specs, self.slots)
        #: Whether token or cost rules are among them (`_reserve_now` decides such a plan).
        self.reserving = any(rule.settled for rule in rules)
        _, self.policy, self.template = _fields(rules)
        self.single = None if single is None else tuple([single[rule.name] for rule in rules])

    def requests(self, values: tuple[str | None, ...]) -> list[LimitRequest]:
        """What the general path asks of the store for the same decision (`values`: as
        `_applying` answers them)."""
        return [
            LimitRequest(name, config, key, count)
            for (name, config, count, _), key in zip(
                self.specs, self.limits.keys(values), strict=True
            )
        ]


class _Matched:
    """The rules matching one route, with what can be computed once for them."""

    __slots__ = (
        "_partial",
        "_single",
        "_subsets",
        "by_ip",
        "by_user",
        "fields",
        "fixed",
        "max_body",
        "needs_request",
        "optional",
        "plan",
        "rules",
        "tiers",
    )

    def __init__(self, rules: tuple[Rule, ...], fast: bool, single: _Single | None) -> None:
        self.rules = rules
        # The fast path's plan, when it can decide this route (see RateLimitMiddleware).
        self.plan = (
            _Plan(rules, single)
            if fast
            and rules
            and not any(
                callable(rule.key) or callable(rule.count) or callable(rule.estimate) or rule.tier
                for rule in rules
            )
            else None
        )
        kinds = {rule.key for rule in rules}
        self.by_ip = "ip" in kinds
        self.by_user = "user" in kinds
        #: Where `_applying` finds the keys this route's rules need but a caller may not
        #: have (a user, an API key, a fingerprint): a rule whose key is absent does not apply.
        self.optional = tuple([_SLOTS[kind] for kind in _OPTIONAL if kind in kinds])
        self._single = single
        # The plans without such rules, by which of the three keys are absent (at most 8).
        self._partial: dict[tuple[bool, ...], _Plan] = {}
        # Only a key, cost or estimate function reads the request: the others need no
        # `Request` made.
        self.needs_request = any(
            callable(rule.key) or callable(rule.count) or callable(rule.estimate) for rule in rules
        )
        # Token and cost rules read the body, up to the most any of them reads; 0: none here.
        self.max_body = max((rule.max_body for rule in rules if rule.settled), default=0)
        self.tiers = any(rule.tier for rule in rules)
        self.fields = _fields(rules)
        # At most one entry per subset of the route's few rules.
        self._subsets: dict[tuple[str, ...], _Fields] = {}
        requests = [rule.fixed_request for rule in rules]
        # Global rules with constant costs ask the same of the store on every request.
        self.fixed: tuple[LimitRequest, ...] | None = (
            tuple(r for r in requests if r is not None)
            if all(r is not None for r in requests)
            else None
        )

    def without(self, values: tuple[str | None, ...]) -> _Plan:
        """The plan of the rules that apply when some of the user, API key and fingerprint
        are unknown (None in `_applying`'s `values`); its `specs` are empty when none does."""
        absent = tuple([values[_SLOTS[kind]] is None for kind in _OPTIONAL])
        plan = self._partial.get(absent)
        if plan is None:
            missing = {kind for kind, gone in zip(_OPTIONAL, absent, strict=True) if gone}
            rules = tuple(rule for rule in self.rules if rule.key not in missing)
            plan = self._partial[absent] = _Plan(rules, self._single)
        return plan

    def subset(self, rules: Sequence[Rule]) -> _Fields:
        """The fields of the rules that applied to one request, when not all of them did."""
        names = tuple([rule.name for rule in rules])
        fields = self._subsets.get(names)
        if fields is None:
            fields = self._subsets[names] = _fields(rules)
        return fields


#: The kinds of key a caller may not have.
_OPTIONAL = ("user", "api_key", "fingerprint")


def _announce(ctx: GuardContext, policy: bytes, field: bytes) -> None:
    """Add an admitted request's two fields (with `ratelimit_items="closest"`, those of the
    policy nearest exhaustion alone)."""
    fields = [(b"ratelimit-policy", policy), (b"ratelimit", field)]
    added = ctx.response_headers
    if added is None:
        ctx.response_headers = fields
    else:
        added += fields


def _applying(
    scope: Scope, ctx: GuardContext, matched: _Matched, plan: _Plan
) -> tuple[_Plan, tuple[str | None, ...]]:
    """The plan of the rules that apply to this caller (those whose key it has) and the
    values their keys are read from (by `_SLOTS`), for the fast paths."""
    user = user_key(scope, ctx) if matched.by_user else None
    # By `_SLOTS`: what each kind of rule is keyed by (as `Rule.resolve_key` reads it).
    values = (
        None,
        ip_key(scope, ctx) if matched.by_ip else None,
        user,
        ctx.api_key_id,
        ctx.fingerprint,
    )
    for slot in matched.optional:
        if values[slot] is None:  # an anonymous caller: its rules do not apply
            plan = matched.without(values)
            break
    return plan, values


def _reservations_asked(
    rules: Sequence[Rule], specs: Sequence[LimitSpec], keys: Sequence[str | None]
) -> list[LimitRequest]:
    """What the general path asks of the store for `_reserve_now`'s decision."""
    return [
        LimitRequest(name, config, key, count, False, rule.settled)
        for (name, config, count, _), key, rule in zip(specs, keys, rules, strict=True)
    ]


async def _read_payload(
    scope: Scope, receive: Receive, ctx: GuardContext, matched: _Matched
) -> tuple[bytes, Any, Refusal | None]:
    """The body a route's token and cost rules estimate from (at most `matched.max_body`
    bytes) and its JSON (None when empty or not JSON), or the 413 past that size."""
    body = b""
    payload: Any = None
    if scope["type"] == "http":
        try:
            body = await read_body(ctx, receive, matched.max_body)
        except BodyTooLarge as exc:
            ctx.rejected = "rate_limited:body"
            logger.info("Rate limit: body over %d bytes refused", exc.limit)
            refusal = problem(
                413,
                "Request body too large",
                detail=f"A request here may send at most {exc.limit} bytes.",
            )
            return body, payload, refusal
        if body:
            try:
                payload = json.loads(body)
            # Not JSON (or not UTF-8), or nested past the parser's recursion limit (a body of
            # `[`s, which request validation refuses next): estimated from its length.
            except (ValueError, RecursionError):
                payload = None
    return body, payload, None


def _prompt_estimate(body: bytes) -> float:
    """The default estimate of the prompt a request's body sends."""
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):  # as `_read_payload`
        payload = None
    return DEFAULT_ESTIMATE.prompt(payload, body)


def _refused_note(rules: Sequence[Rule]) -> str:
    """What the log row says of the rules that refused: `budget_exceeded:` when a budget is
    among them (its own reason in the stats), else `rate_limited:`."""
    names = ",".join(rule.name for rule in rules)
    if any(rule.unit == "cost" for rule in rules):
        return "budget_exceeded:" + names
    return "rate_limited:" + names


def _fields(rules: Sequence[Rule]) -> _Fields:
    policy = ", ".join([rule.policy_header for rule in rules])
    return policy, policy.encode("latin-1"), ratelimit_template([rule.name for rule in rules])


def _lazy_request(scope: Scope, receive: Receive) -> Callable[[], Request]:
    """The request's `Request`, made on first use and shared by every rule that asks.

    A WebSocket handshake has no body to read: its key and cost functions get the
    handshake's `HTTPConnection` (headers, path, client, state), which is what they read.
    """
    request: Request | None = None

    def get_request() -> Request:
        nonlocal request
        if request is None:
            request = (
                Request(scope, receive)
                if scope["type"] == "http"
                else cast(Request, HTTPConnection(scope, receive))
            )
        return request

    return get_request


def _no_request() -> Request:
    raise AssertionError("no rule of this route reads the request")
