"""sdxl_ui.logins, the logins both front ends check: the failed-login throttle (per address and per account), the
constant-time password check, the loopback addresses. Pure: the clock is passed in."""
from __future__ import annotations

from sdxl_ui.logins import LOOPBACK, LoginThrottle, password_matches


def fail(throttle: LoginThrottle, client: str, now: float, user: str = "alice") -> tuple[str | None, float]:
    refused, delay = throttle.begin(client, now, user)
    if refused is None:
        throttle.end(client, False, now, user)
    return refused, delay


def test_password_matches_only_the_users_own_password_as_utf8():
    logins = {"alice": "pw", "björn": "ünïcode"}
    assert password_matches(logins, "alice", "pw") and password_matches(logins, "björn", "ünïcode")
    assert not password_matches(logins, "alice", "PW") and not password_matches(logins, "alice", "")
    assert not password_matches(logins, "alice", None) and not password_matches(logins, "carol", "pw")
    assert not password_matches(logins, None, "pw") and not password_matches({}, "alice", "pw")
    assert not password_matches(logins, "björn", "unicode")


def test_loopback_is_this_machine_only():
    assert {"127.0.0.1", "::1", "localhost"} == set(LOOPBACK)
    assert "0.0.0.0" not in LOOPBACK and "testclient" not in LOOPBACK


def test_the_first_failures_are_free_then_each_waits_longer_up_to_the_most():
    throttle = LoginThrottle(free=2, lock_after=10, base_delay_s=1.0, max_delay_s=4.0)
    delays = [fail(throttle, "1.2.3.4", 10.0 + i)[1] for i in range(6)]
    assert delays == [0.0, 0.0, 1.0, 2.0, 4.0, 4.0]
    assert throttle.recent_failures("1.2.3.4", 16.0) == 6 and throttle.recent_failures("5.6.7.8", 16.0) == 0


def test_clean_means_fewer_than_the_free_failures_within_the_window():
    throttle = LoginThrottle(free=2, window_s=100.0)
    assert throttle.clean("a", 0.0)
    fail(throttle, "a", 1.0)
    assert throttle.clean("a", 2.0)
    fail(throttle, "a", 2.0)
    assert not throttle.clean("a", 3.0) and throttle.clean("b", 3.0)
    assert throttle.clean("a", 150.0)  # the failures left the window


def test_an_address_is_locked_after_lock_after_failures_even_with_the_right_password():
    throttle = LoginThrottle(free=1, lock_after=3, base_delay_s=0.0, max_delay_s=0.0, window_s=60.0)
    for i in range(3):
        assert fail(throttle, "a", float(i))[0] is None
    assert throttle.locked("a", 3.0) and not throttle.locked("b", 3.0)
    refused, _ = throttle.begin("a", 3.0, "alice")
    assert refused.startswith("Too many failed logins from this address; try again in 1 min")
    assert not throttle.locked("a", 2.0 + 60.0 + 1.0)  # the lock lasts window_s


def test_a_success_clears_the_address_and_makes_it_known_to_the_account():
    throttle = LoginThrottle(free=1, account_free=2, base_delay_s=1.0, max_delay_s=8.0, account_max_delay_s=8.0)
    fail(throttle, "home", 0.0)
    assert not throttle.clean("home", 1.0)
    assert throttle.begin("home", 1.0, "alice") == (None, 1.0)
    assert throttle.end("home", True, 1.0, "alice") == (0, False)
    assert throttle.clean("home", 2.0)
    for i, address in enumerate(("x1", "x2", "x3")):  # guesses from other addresses on the account
        fail(throttle, address, 3.0 + i)
    assert throttle.begin("y", 10.0, "alice")[1] > 0  # a new address waits for the account's sake
    throttle.end("y", False, 10.0, "alice")
    assert throttle.begin("home", 11.0, "alice") == (None, 0.0)  # the owner's known address does not
    throttle.end("home", True, 11.0, "alice")


def test_one_attempt_at_a_time_per_address_and_few_at_once_per_slowed_account():
    throttle = LoginThrottle(free=0, account_free=0, account_parallel=1)
    assert throttle.begin("a", 0.0, "alice")[0] is None
    assert throttle.begin("a", 0.0, "alice")[0] == "One login attempt at a time, please"
    refused, _ = throttle.begin("b", 0.0, "alice")
    assert refused.startswith("Too many login attempts for this account at once")
    throttle.end("a", False, 0.0, "alice")
    assert throttle.begin("b", 0.0, "alice")[0] is None


def test_names_tried_once_long_ago_are_forgotten():
    throttle = LoginThrottle(window_s=10.0)
    for i in range(10_001):
        throttle.begin(f"c{i}", 0.0, f"user{i}")
        throttle.end(f"c{i}", False, 0.0, f"user{i}")
    throttle.begin("late", 100.0, "late-user")
    throttle.end("late", False, 100.0, "late-user")
    assert list(throttle.account_failures) == ["late-user"]
