"""User-agents the lists know whole or by how they begin, which no prefilter key can wake."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convex_guard.core.useragent import (
    _WHOLE,
    _WHOLE_LENGTH,
    _fold,
    classify_user_agent,
    classify_user_agent_uncached,
)

CHROME = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) "
    "Chrome/131.0.0.0 Safari/537.36"
)


@pytest.mark.parametrize(
    ("ua", "category", "name"),
    [
        # device-detector's ^(?:chrome|desktop|firefox|…|node|Node\.js|…)$: a browser's name alone
        # is what a script sends, and "chrome" is a browser token no rule may be keyed by.
        ("Chrome", "other_bot", "chrome"),
        ("desktop", "other_bot", "desktop"),
        (" Firefox ", "other_bot", "firefox"),
        ("Node.js", "other_bot", "Node.js"),
        ("Report Runner", "other_bot", "Report Runner"),
        ("Google", "search_engine", "Google"),  # ^Google$
        # Agents' names no prefilter key can wake (no letters run of three, or only weak
        # ones), sent alone: device-detector's names.
        ("xx032_bo9vs83_2a", "other_bot", "xx032_bo9vs83_2a"),
        ("24x7", "monitor", "24x7"),
        # Disguised: folded before it is looked up (a zero-width space, full-width letters).
        ("Chrome\u200b", "other_bot", "chrome"),
        ("\uff23\uff48\uff52\uff4f\uff4d\uff45", "other_bot", "chrome"),
    ],
)
def test_an_agent_named_whole_is_that_agent(ua: str, category: str, name: str) -> None:
    verdict = classify_user_agent_uncached(ua)
    assert (verdict.is_bot, verdict.category, verdict.name) == (True, category, name)
    assert classify_user_agent(ua) == verdict


@pytest.mark.parametrize(
    "ua",
    [
        "Chrome/131.0.0.0",  # more than the whole name: not what the pattern names
        "Googlebot-ish desktop app",
        "my desktop",
        CHROME,
        "Mozilla/5.0 (X11; Linux x86_64; rv:133.0) Gecko/20100101 Firefox/133.0",
    ],
)
def test_a_user_agent_that_only_contains_such_a_name_is_not_it(ua: str) -> None:
    verdict = classify_user_agent_uncached(ua)
    assert verdict.name not in {"chrome", "desktop", "firefox", "Google"}


@pytest.mark.parametrize(
    ("ua", "category", "name"),
    [
        # Beginnings too short or too weak to key the prefilter by ("bw", "silk", "ds").
        ("BW/1.1; bit.ly/3eZNDnO", "other_bot", "BW"),  # crawler-user-agents ^BW\/
        ("silk/1.0", "other_bot", "Silk"),  # crawler-user-agents ^Silk\/
        ("ds9 2.000.ec2", "other_bot", "ds9"),  # device-detector ^ds9
    ],
)
def test_an_agent_known_by_its_beginning_is_that_agent(ua: str, category: str, name: str) -> None:
    verdict = classify_user_agent_uncached(ua)
    assert (verdict.is_bot, verdict.category, verdict.name) == (True, category, name)


@pytest.mark.parametrize(
    "ua",
    [
        # The same words elsewhere than at the start: an Amazon Silk browser, a phone model.
        "Mozilla/5.0 (Linux; Android 9; KFTRWI) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Silk/120.2.1 like Chrome/120.0.6099.230 Safari/537.36",
        "Mozilla/5.0 (Linux; Android 12; BW Pro) AppleWebKit/537.36 (KHTML, like Gecko) "
        "Chrome/120.0.0.0 Mobile Safari/537.36",
    ],
)
def test_the_same_beginning_inside_a_browser_is_a_person(ua: str) -> None:
    assert classify_user_agent_uncached(ua).is_bot is False


@given(
    # Under four characters a user-agent is suspicious before any lookup ("url" too).
    st.sampled_from(sorted(name for name in _WHOLE if len(name) >= 4)),
    st.text(alphabet=" \t"),
    st.text(alphabet=" \t"),
    st.text(max_size=8),
)
def test_a_name_is_looked_up_whole_or_not_at_all(
    name: str, before: str, after: str, more: str
) -> None:
    """Around a whole-named agent's text, in any case, spaces still name it (in a user-agent
    short enough to be looked at whole); anything more makes another user-agent, decided by
    the rest of the classifier, never by the lookup."""
    padded = before + name.upper() + after
    if len(padded) < _WHOLE_LENGTH:
        assert classify_user_agent_uncached(padded) is _WHOLE[name]
    other = name + more
    verdict = classify_user_agent_uncached(other)
    if _fold(other).strip() != name:  # as the classifier reads it: disguises folded away
        assert verdict is not _WHOLE[name]
