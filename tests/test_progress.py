"""Progress of long steps: the evaluation's lines at most every ten seconds, and the time a
run has left after each round (pure functions of numbers; no clock is read)."""

from fedlora.train.progress import Ticker, clock, run_eta


def test_run_eta_estimates_the_rounds_left_from_the_mean_round_after_the_first():
    # round 1 also loads the models: no estimate from it alone, and it is left out after
    assert run_eta(1, 5, 40.0, [40.0]) == (
        "round 1/5 done in 40.0 s; 40 s elapsed; 4 round(s) left (an estimate after the "
        "next round)")
    assert run_eta(3, 5, 70.0, [40.0, 12.0, 18.0]) == (
        "round 3/5 done in 18.0 s; 1 min 10 s elapsed; 2 round(s) left, about 30 s "
        "(mean 15.0 s/round)")
    assert run_eta(2, 200, 3725.0, [3600.0, 125.0]).endswith(
        "1 h 02 min elapsed; 198 round(s) left, about 6 h 52 min (mean 125.0 s/round)")
    assert run_eta(5, 5, 100.0, [40.0, 15.0, 15.0, 15.0, 15.0]) == (
        "round 5/5 done in 15.0 s; 1 min 40 s elapsed; that was the last round")
    # a resumed run: its first round in this process is round 4
    assert run_eta(5, 6, 30.0, [20.0, 10.0]).endswith("1 round(s) left, about 10 s "
                                                      "(mean 10.0 s/round)")
    assert (clock(59.4), clock(60), clock(3599), clock(7260)) == (
        "59 s", "1 min 00 s", "59 min 59 s", "2 h 01 min")


def test_ticker_prints_at_most_one_line_every_ten_seconds(capsys):
    now = [100.0]
    ticker = Ticker("client 0 round 1: evaluating", 32, "answers", clock=lambda: now[0])
    said = []
    for done, at in ((0, 100.0), (8, 104.0), (16, 111.0), (24, 115.0), (28, 121.5),
                     (30, 121.9)):
        now[0] = at
        said.append(ticker.update(done))
    assert said == [None, None, "client 0 round 1: evaluating: 16/32 answers, 11 s", None,
                    "client 0 round 1: evaluating: 28/32 answers, 22 s", None]
    assert capsys.readouterr().err.splitlines() == [s for s in said if s]
