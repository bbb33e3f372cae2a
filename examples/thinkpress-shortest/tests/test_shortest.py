from thinkpress_shortest import Shortest

from thinkpress.api import Problem, Sample


def _s(pid, i, n, correct=True, finish="eos"):
    return Sample(problem_id=pid, index=i, prompt="p", completion=f"c{i}", n_tokens=n, finish_reason=finish,
                  correct=correct)


class _Ctx:
    stats: dict = {}


def test_keeps_shortest_correct_per_problem():
    samples = [_s("a", 0, 30), _s("a", 1, 10), _s("a", 2, 5, correct=False), _s("a", 3, 8, finish="length"),
               _s("b", 0, 12, correct=False)]
    out = Shortest(Shortest.Config()).select(samples, [Problem(id="a", question="q", answer="1")], _Ctx())
    assert [e.id for e in out.examples] == ["a#1"]


def test_per_problem_and_correct_only_off():
    samples = [_s("a", 0, 30), _s("a", 1, 10), _s("a", 2, 5, correct=False)]
    out = Shortest(Shortest.Config(per_problem=2, correct_only=False)).select(samples, [], _Ctx())
    assert [e.id for e in out.examples] == ["a#2", "a#1"]
