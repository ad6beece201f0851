"""A small company's departments as folders (a handbook, answered conversations, a question list), for
the grounding and server tests: real sentences with concrete facts, written for the tests."""

from __future__ import annotations

import json
from dataclasses import replace

from support.tiny import tiny_config

HANDBOOKS = {
    "hr": """# People handbook

## Annual leave
Full-time employees get 27 days of annual leave per calendar year. Part-time staff get a pro-rata share
of the same allowance, rounded up to the next half day.

Leave requests go through the PeoplePortal form HR-12 at least two weeks before the first day off.

## Sick leave
A sick note from a doctor is needed from the third day of absence. Call your team lead before 9:00 on
the first morning you are ill, and again each day until you have the note.

## Parental leave
Parents may take up to 36 months of parental leave per child. Tell the people team in writing at least
seven weeks before it starts.
""",
    "it": """# Service desk handbook

## Remote access
The VPN host is vpn.kestrel.example and it needs the authenticator app on your phone. The client is
preinstalled on every company laptop; the certificate is renewed every 365 days automatically.

## Passwords
Passwords must be at least 14 characters long. They expire every 180 days, and the last 12 passwords
cannot be used again. Reset a forgotten password at reset.kestrel.example.

## Printers
Every floor has a printer named after its room, for example PRN-2-EAST. Print jobs are held until you
badge in at the printer, and uncollected jobs are deleted after 24 hours.
""",
}
CONVERSATIONS = {
    "hr": [("How many vacation days do I get?", "Full-time employees get 27 days of annual leave a year."),
           ("When do I need a sick note?", "From the third day of absence you need a doctor's note."),
           ("Which form do I use for leave?", "Use the PeoplePortal form HR-12, two weeks ahead."),
           ("How long can parental leave last?", "Up to 36 months per child."),
           ("Who do I call when I'm ill?", "Call your team lead before 9:00."),
           ("Do part-timers get leave too?", "Yes, a pro-rata share of the 27 days."),
           ("How early must I announce parental leave?", "At least seven weeks before it starts, in writing."),
           ("Can I book leave last minute?", "Requests should go in two weeks before the first day off.")],
    "it": [("What's the VPN address?", "Connect to vpn.kestrel.example with the authenticator app."),
           ("How long must my password be?", "At least 14 characters."),
           ("How often do passwords expire?", "Every 180 days."),
           ("I forgot my password, what now?", "Reset it at reset.kestrel.example."),
           ("Where did my print job go?", "Jobs wait until you badge in at the printer, for 24 hours."),
           ("Can I reuse an old password?", "Not any of your last 12 passwords."),
           ("Do I need to install the VPN client?", "No, it is preinstalled on every company laptop."),
           ("What is the printer on floor 2 called?", "For example PRN-2-EAST, named after its room.")],
}
QUESTIONS = {"hr": ["Is there a bonus for referrals?", "Who approves overtime?", "Can I carry leave over?"],
             "it": ["Can I use my own laptop?", "Is there a guest Wi-Fi?", "How do I get a second screen?"]}


def department(root, name, *, question_answer_lines=False):
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "handbook.md").write_text(HANDBOOKS[name], encoding="utf-8")
    rows = [{"id": f"{name}-{i}", "messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for i, (q, a) in enumerate(CONVERSATIONS[name])]
    if question_answer_lines:  # the FAQ shape: {"question", "answer"}
        rows = [{"id": r["id"], "question": r["messages"][0]["content"], "answer": r["messages"][1]["content"]}
                for r in rows]
    (folder / "conversations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (folder / "questions.txt").write_text("\n".join(QUESTIONS[name]) + "\n", encoding="utf-8")
    return folder



def grounded_config():
    # Small passages: the tiny model's context is short. No written questions: a tiny random model
    # writes none worth keeping (tests that want them ask for them).
    return replace(tiny_config(), grounding_passages=1, passage_words=20, synthetic_questions=0,
                   paraphrase_questions=False)
