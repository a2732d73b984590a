"""Client-chosen names the gateway repeats (in errors, the access log, spans) stay short."""

from __future__ import annotations

from gateway.errors import MAX_ECHOED, GatewayError, echoed, model_not_found


def test_a_short_name_is_repeated_whole_and_a_long_one_by_its_start_and_its_length():
    assert echoed("gpt-4o") == "gpt-4o"
    assert echoed("x" * MAX_ECHOED) == "x" * MAX_ECHOED
    long = "y" * (MAX_ECHOED + 1)
    assert echoed(long) == "y" * MAX_ECHOED + f"... ({MAX_ECHOED + 1} characters)"


def test_an_unknown_models_error_quotes_a_ten_megabyte_name_in_under_a_kilobyte():
    err = model_not_found("z" * (10 << 20))
    assert err.status == 404 and err.code == "model_not_found"
    assert len(err.body()) < 1024 and f"({10 << 20} characters)" in err.message


def test_an_error_whose_answer_never_left_is_logged_with_dc_after_its_own_flags():
    assert model_not_found("m").undelivered().flag == "NR,DC"
    assert GatewayError(429, "slow down", flag="RL,RLL").undelivered().flag == "RL,RLL,DC"
    assert GatewayError(400, "bad").undelivered().flag == "DC"  # a flagless error is DC alone
    err = model_not_found("m")
    # the same answer, and the error itself untouched
    assert err.undelivered().body() == err.body() and err.flag == "NR"
