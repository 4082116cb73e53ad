"""Which worker sends each domain: the table the workers of a node share."""

from __future__ import annotations

import os

import pytest

from copiamail.scheduling import domain_owners
from copiamail.scheduling.domain_owners import PROBES, DomainOwners
from copiamail.scheduling.limits import worker_of


def test_domains_are_given_in_turn_so_equal_domains_split_evenly():
    owners = DomainOwners.create(2)
    assert [owners.owner(f"d{i}.bench") for i in range(50)] == [0, 1] * 25
    assert owners.given() == [25, 25]
    three = DomainOwners.create(3)
    for i in range(50):
        three.owner(f"d{i}.bench")
    assert three.given() == [17, 17, 16]


def test_a_domain_keeps_its_worker_and_another_mapping_of_the_table_finds_the_same():
    owners = DomainOwners.create(2)
    first = {d: owners.owner(d) for d in ("a.test", "b.test", "c.test")}
    assert {d: owners.owner(d) for d in first} == first
    fresh = DomainOwners(os.dup(owners._fd), 2)  # a process that has looked nothing up yet
    assert {d: fresh.owner(d) for d in reversed(list(first))} == first
    assert fresh.given() == [2, 1]


def test_workers_of_forked_processes_agree_and_stay_even_however_they_race():
    owners = DomainOwners.create(2)
    domains = [f"x{i}.test" for i in range(400)]
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the other worker, going through the domains the other way round
        try:
            answers = bytes(owners.owner(d) for d in reversed(domains))
            os.write(w, answers)
        finally:
            os._exit(0)
    os.close(w)
    mine = [owners.owner(d) for d in domains]
    theirs = b""
    while chunk := os.read(r, 4096):
        theirs += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert list(reversed(theirs)) == mine
    assert owners.given() == [200, 200]


def test_a_domain_whose_places_are_all_taken_goes_by_the_fixed_hash_for_good():
    owners = DomainOwners.create(2, entries=4)
    domains = [f"d{i}.test" for i in range(12)]
    answers = [owners.owner(d) for d in domains]
    assert sum(owners.given()) == 4  # the table is full
    assert answers[4:] == [worker_of(d, 2) for d in domains[4:]]
    fresh = DomainOwners(os.dup(owners._fd), 2, entries=4)
    assert [fresh.owner(d) for d in reversed(domains)] == list(reversed(answers))
    assert PROBES > 4


def test_a_table_must_have_workers_and_a_power_of_two_of_entries():
    with pytest.raises(ValueError):
        DomainOwners.create(0)
    with pytest.raises(ValueError):
        DomainOwners.create(2, entries=6)


def test_a_workers_copy_is_emptied_when_full_and_the_table_still_answers(monkeypatch):
    monkeypatch.setattr(domain_owners, "KNOWN_MAX", 3)
    owners = DomainOwners.create(2)
    first = [owners.owner(f"d{i}.test") for i in range(5)]
    assert len(owners._known) <= 3
    assert [owners.owner(f"d{i}.test") for i in range(5)] == first
    assert owners.given() == [3, 2]


def test_a_domain_left_answers_its_next_worker_here_at_once_and_elsewhere_only_once_moved():
    owners = DomainOwners.create(2)
    assert owners.owner("a.test") == 0
    other = DomainOwners(os.dup(owners._fd), 2)  # another worker's mapping
    assert other.owner("a.test") == 0
    generation = owners.generation
    owners.leave("a.test", 1)
    assert owners.owner("a.test") == 1  # this process sends it no more
    assert other.owner("a.test") == 0 and other.generation == generation  # the table still names worker 0
    owners.move("a.test")
    assert owners.leaving() == {} and owners.owner("a.test") == 1
    assert other.generation == generation + 1
    assert other.owner("a.test") == 0  # its copy, until it forgets it
    other.forget()
    assert other.owner("a.test") == 1
    assert owners.given() == [0, 1]


def test_an_ended_workers_domains_go_to_the_next_worker_to_meet_them_and_it_is_given_no_new_one():
    owners = DomainOwners.create(2)
    assert owners.owner("a.test") == 0 and owners.owner("b.test") == 1
    other = DomainOwners(os.dup(owners._fd), 2)  # worker 1's mapping
    assert other.owner("a.test") == 0
    generation = owners.generation
    owners.end(0)  # its connections have all closed
    assert other.generation == generation + 1  # every copy naming it is forgotten
    other.forget()
    assert other.owner("a.test") == 1
    assert owners.given() == [0, 2]
    assert [other.owner(d) for d in ("c.test", "d.test", "e.test")] == [1, 1, 1]  # never to the ended worker
    fresh = DomainOwners(os.dup(owners._fd), 2)
    assert fresh.owner("a.test") == 1


def test_a_domain_met_after_every_worker_ended_still_gets_a_worker():
    owners = DomainOwners.create(2)
    owners.end(0)
    owners.end(1)
    assert owners.owner("late.test") in (0, 1)


def test_a_domain_given_to_a_worker_that_asks_raises_the_generation_and_one_given_to_a_busy_worker_does_not():
    owners = DomainOwners.create(2)
    generation = owners.generation
    assert owners.owner("a.test") == 0
    assert owners.generation == generation
    owners.ask(1, True)
    assert owners.owner("b.test") == 1
    assert owners.generation == generation + 1


def test_a_worker_ended_for_want_of_work_raises_the_generation_too():
    owners = DomainOwners.create(2)
    owners.owner("a.test")
    generation = owners.generation
    owners.ask(0, True)
    owners.ask(1, True)
    assert owners.end_if_unanswered(0)
    assert owners.generation == generation + 1
    assert owners.owner("z.test") == 1


def test_a_domain_that_went_by_the_fixed_hash_cannot_move():
    owners = DomainOwners.create(2, entries=4)
    domains = [f"d{i}.test" for i in range(12)]
    for d in domains:
        owners.owner(d)
    assert all(owners.movable(d) for d in domains[:4])
    assert not any(owners.movable(d) for d in domains[4:])


def test_a_request_is_answered_by_one_worker_and_an_unanswered_one_ends_only_when_nobody_can_give():
    owners = DomainOwners.create(3)
    assert not owners.asked_by_others(0)
    owners.ask(1, True)
    assert owners.asked_by_others(0) and not owners.asked_by_others(1)
    assert not owners.end_if_unanswered(1)  # workers 0 and 2 still send
    assert owners.take_request(0) == 1
    assert owners.take_request(2) is None  # taken once
    assert not owners.asking(1) and not owners.end_if_unanswered(1)  # answered: it waits for the move
    owners.ask(1, True)
    owners.ask(2, True)
    owners.end(0)
    assert owners.end_if_unanswered(1)  # 0 has ended and 2 asks too
    assert owners.take_request(2) is None  # an ended worker's request is gone
    assert owners.end_if_unanswered(2)
    assert owners.others_idle(0)
