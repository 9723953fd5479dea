#!/usr/bin/env python3
"""Generate a labelled evaluation corpus for the data plane's PII scanner.

    python3 dataplane/pii-corpus/generate.py --seed 1 --count 3000 --out corpus.jsonl [--check]

Each output line is one synthetic prompt, as a user would send it to an LLM (support tickets,
e-mails to summarise, HR notes, invoices, server logs and config, code with credentials,
travel bookings, CRM notes), in English, German or French:

    {"lang": "de", "text": "...", "spans": [{"start": 17, "end": 39, "entity": "iban"}]}

`start`/`end` are UTF-8 byte offsets into `text` (end exclusive), sorted, never overlapping;
`entity` is one of email, phone, card, ssn, iban, ip, secret. A document holds 0 to 4 labelled
entities. The output is a function of the seed alone (`random.Random(seed)`).

Labels follow `dataplane/PII.md` (the labelling rules): only values PII.md calls an entity are
labelled, with exactly the span it defines. Hard negatives -- values PII.md says are *not* an
entity (Luhn failures, IBANs with bad check digits or irregular grouping, SSNs in excluded
ranges, bare US numbers, `1.2.3.4.5`, `256.1.1.1`, `12:30:45`, MAC addresses, `sk-learn-...`,
certificates, JWTs without `alg` ...) and look-alikes no rule covers (order and invoice numbers,
timestamps, Unix times, versions, UUIDs, hashes, tracking numbers, postcodes, amounts) -- are
planted in the same prompts without a label; about 40% of documents hold at least one.
The product's own gateway keys (`aigw_...`, CRC-checked) are not generated.

`--check` verifies the corpus while writing it: every span decodes to the planted value, spans
are sorted and disjoint, every card passes Luhn and a brand range, every IBAN mod-97, every SSN
the ranges, every hard negative fails its rule; and a re-implementation of the scanner's rules
in Python (`Reference` below: the patterns of `src/pii/patterns.rs`, the validators of
`src/pii/validate.rs`, the overlap rule of `src/pii/scanner.rs`) finds exactly the labelled
spans in every document. That reference is only a consistency check; the Rust scanner run over
this corpus is the real evaluation.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import ipaddress
import json
import random
import re
import sys
import unicodedata
from collections import Counter

ENTITIES = ("email", "phone", "card", "ssn", "iban", "ip", "secret")
LANGS = ("en", "de", "fr")
MAX_SPANS = 4
# Chance that a labelled slot of a template receives a near miss of the same kind instead.
P_NEAR_MISS = 0.05

DIGITS = "0123456789"
UPPER = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
LOWER = UPPER.lower()
ALNUM = UPPER + LOWER + DIGITS
HEX = "0123456789abcdef"
B64 = ALNUM + "+/"


def digits(rng: random.Random, n: int) -> str:
    return "".join(rng.choice(DIGITS) for _ in range(n))


def nonzero(rng: random.Random, lo: str = "1") -> str:
    return rng.choice(DIGITS[int(lo):])


def chars(rng: random.Random, alphabet: str, n: int) -> str:
    return "".join(rng.choice(alphabet) for _ in range(n))


def has_classes(s: str) -> bool:
    return (any(c.isdigit() for c in s) and any(c.isupper() for c in s)
            and any(c.islower() for c in s))


def token(rng: random.Random, n: int, alphabet: str = ALNUM) -> str:
    """n characters of alphabet with a digit, an upper- and a lower-case letter, ending alnum
    (a trailing '-' is not part of a token's span per PII.md)."""
    while True:
        s = chars(rng, alphabet, n)
        if has_classes(s) and s[-1].isalnum() and s[0].isalnum():
            return s


def group(s: str, sizes: list[int], sep: str) -> str:
    out, i = [], 0
    for n in sizes:
        out.append(s[i:i + n])
        i += n
    assert i == len(s), (s, sizes)
    return sep.join(out)


def fold(s: str) -> str:
    """ASCII form of a name for an e-mail address: Müller -> mueller, Lefèvre -> lefevre."""
    s = s.translate(str.maketrans({"ä": "ae", "ö": "oe", "ü": "ue", "Ä": "Ae", "Ö": "Oe",
                                   "Ü": "Ue", "ß": "ss", "ı": "i", "&": " "}))
    s = unicodedata.normalize("NFKD", s)
    return "".join(c for c in s if c.isascii() and (c.isalnum() or c in " -")).strip()


# ============================================================================================
# Checksums shared by the generators and the checks
# ============================================================================================

def luhn_ok(number: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(number)):
        x = ord(ch) - 48
        if i % 2 == 1:
            x = x * 2 - 9 if x * 2 > 9 else x * 2
        total += x
    return total % 10 == 0


def luhn_complete(partial: str) -> str:
    return next(partial + d for d in DIGITS if luhn_ok(partial + d))


def iban_mod97(compact: str) -> int:
    rearranged = compact[4:] + compact[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97


def with_check_digits(country: str, bban: str) -> str:
    return f"{country}{98 - iban_mod97(country + '00' + bban):02d}{bban}"


def card_brand(d: str) -> str | None:
    """Brand ranges and lengths of PII.md's CARD row (as validate.rs `card_brand`)."""
    n = len(d)

    def p(k: int) -> int:
        return int(d[:k])

    if d[0] == "4" and n in (13, 16, 19):
        return "visa"
    if (51 <= p(2) <= 55 or 2221 <= p(4) <= 2720) and n == 16:
        return "mastercard"
    if p(2) in (34, 37) and n == 15:
        return "amex"
    if (p(4) == 6011 or 644 <= p(3) <= 649 or p(2) == 65 or 622126 <= p(6) <= 622925) \
            and 16 <= n <= 19:
        return "discover"
    if 3528 <= p(4) <= 3589 and 16 <= n <= 19:
        return "jcb"
    if (300 <= p(3) <= 305 or p(4) == 3095 or p(2) in (36, 38, 39)) and 14 <= n <= 19:
        return "diners"
    if 2200 <= p(4) <= 2204 and 16 <= n <= 19:
        return "mir"
    if p(2) in (62, 81) and 16 <= n <= 19:
        return "unionpay"
    if (p(2) in (60, 82) or p(3) == 508 or p(4) in (6521, 6522)) and n == 16:
        return "rupay"
    if (506099 <= p(6) <= 506198 or 650002 <= p(6) <= 650027) and n in (16, 18, 19):
        return "verve"
    if p(4) in (5018, 5020, 5038, 5893, 6304, 6759, 6761, 6762, 6763) and 12 <= n <= 19:
        return "maestro"
    return None


def ssn_ok(d: str) -> bool:
    area, grp, serial = int(d[:3]), int(d[3:5]), int(d[5:])
    return area not in (0, 666) and area < 900 and grp != 0 and serial != 0


# IBAN lengths PII.md lists (others 15..34); BBAN shapes: n digit, a letter, c alphanumeric.
IBAN_LENGTHS = {"AT": 20, "BE": 16, "CH": 21, "CZ": 24, "DE": 22, "DK": 18, "ES": 24,
                "FI": 18, "FR": 27, "GB": 22, "GR": 27, "IE": 22, "IT": 27, "LU": 20,
                "NL": 18, "NO": 15, "PL": 28, "PT": 25, "SE": 24}
BBAN = {"DE": "18n", "AT": "16n", "CH": "5n12c", "FR": "10n11c2n", "BE": "12n",
        "LU": "3n13c", "GB": "4a14n", "IE": "4a14n", "NL": "4a10n", "ES": "20n",
        "IT": "1a10n12c", "PL": "24n", "PT": "21n"}
BANK_CODES = {"GB": ["NWBK", "BARC", "LOYD", "HBUK", "MIDL", "WEST"],
              "IE": ["AIBK", "BOFI"], "NL": ["ABNA", "INGB", "RABO", "SNSB"]}


def iban_ok(value: str) -> bool:
    """PII.md IBAN: upper case, bare or groups of four, listed length, mod-97 = 1."""
    if " " in value:
        groups = value.split(" ")
        if any(len(g) != 4 for g in groups[:-1]) or not 1 <= len(groups[-1]) <= 4:
            return False
    compact = value.replace(" ", "")
    if not re.fullmatch(r"[A-Z]{2}[0-9]{2}[A-Z0-9]+", compact):
        return False
    want = IBAN_LENGTHS.get(compact[:2])
    if (len(compact) != want) if want else not 15 <= len(compact) <= 34:
        return False
    return iban_mod97(compact) == 1


# ============================================================================================
# Languages: people, companies, places
# ============================================================================================

FIRST = {
    "en": ["James", "Olivia", "Priya", "Mohammed", "Sarah", "Daniel", "Emily", "Rahul", "Grace",
           "Thomas", "Aisha", "Liam", "Hannah", "Wei", "Chloe", "Arjun", "Sophie", "Michael",
           "Fatima", "Oliver", "Ananya", "Jessica", "David", "Amelia", "Vikram", "Rachel",
           "Kevin", "Megan", "Siobhan", "Connor"],
    "de": ["Lukas", "Anna", "Jürgen", "Sören", "Mia", "Felix", "Jörg", "Katharina", "Moritz",
           "Lena", "Björn", "Sabine", "Thomas", "Ümit", "Leonie", "Maximilian", "Julia",
           "Stefan", "Özlem", "Hannah", "Niklas", "Ute", "Klaus", "Franziska", "Dieter",
           "Marie", "Jonas", "Sophie", "Heike", "Tobias"],
    "fr": ["Camille", "Léa", "Théo", "Chloé", "Hugo", "Manon", "Jérôme", "Élodie", "François",
           "Inès", "Mathieu", "Zoé", "Nicolas", "Anaïs", "Sébastien", "Clémence", "Lucas",
           "Océane", "Amélie", "Benoît", "Noémie", "Yannick", "Gaëlle", "Karim", "Sofiane",
           "Maëlys", "Hélène", "Loïc", "Aurélie", "Thierry"],
}
LAST = {
    "en": ["Smith", "Patel", "Johnson", "O'Brien", "Williams", "Brown", "Taylor", "Khan",
           "Nguyen", "Garcia", "Walker", "Evans", "Sharma", "Iyer", "Murphy", "Thompson",
           "Reddy", "Clarke", "Hughes", "Robinson", "Chen", "Davies", "Wright", "Nair",
           "Kowalski", "Martinez", "Anderson", "Gupta"],
    "de": ["Müller", "Schmidt", "Schneider", "Fischer", "Weber", "Meyer", "Wagner", "Becker",
           "Schäfer", "Koch", "Bauer", "Hoffmann", "Krüger", "Groß", "Schröder", "Neumann",
           "Schwarz", "Zimmermann", "Braun", "Hartmann", "Lange", "Werner", "Krause",
           "Lehmann", "Köhler", "Yılmaz", "Kaya", "Weiß", "Jäger"],
    "fr": ["Martin", "Bernard", "Dubois", "Thomas", "Robert", "Richard", "Petit", "Durand",
           "Leroy", "Moreau", "Lefèvre", "Girard", "Fournier", "Mercier", "Lambert", "Bonnet",
           "Rousseau", "Fontaine", "Chevalier", "Gauthier", "Perrin", "Morel", "Faure",
           "Benali", "Nguyen", "Lemaître", "Boucher", "Duval", "Garnier"],
}
COMPANIES = {
    "en": ["Northwind Traders", "Globex Ltd", "Initech", "Brightline Logistics",
           "Summit Health Partners", "Acme Analytics", "Bluebell Foods plc",
           "Harbour & Finch LLP", "Redwood Software Inc.", "Kaveri Infotech Pvt Ltd",
           "Pinecrest Realty", "Oakridge Dental", "Lumen Ventures", "Sundaram Textiles"],
    "de": ["Müller & Söhne GmbH", "Nordlicht AG", "Bergmann Logistik GmbH", "Stadtwerke Rheinau",
           "Alpenblick Hotel GmbH", "Schäfer Maschinenbau KG", "Hansa Digital GmbH",
           "Brauerei Kühn", "Elbtal Versicherung AG", "Weber IT-Service e.K.",
           "Lindenhof Apotheke", "Spree Solar GmbH"],
    "fr": ["Boulangerie Dupont SARL", "Transports Lefèvre SAS", "Atelier Moreau",
           "Groupe Horizon SA", "Cabinet Girard & Associés", "Librairie du Vieux Port",
           "Maison Fontaine", "Solutions Numériques Perrin", "Hôtel Bellevue",
           "Coopérative du Val", "Optique Mercier", "Studio Lumière"],
}
CITIES = {
    "en": ["London", "Manchester", "Leeds", "Bristol", "Edinburgh", "New York", "Austin",
           "Seattle", "Chicago", "Boston", "Denver", "San Francisco", "Bengaluru", "Mumbai",
           "Pune", "Hyderabad", "Chennai", "Delhi", "Dublin", "Toronto"],
    "de": ["Berlin", "München", "Hamburg", "Köln", "Frankfurt am Main", "Stuttgart",
           "Düsseldorf", "Leipzig", "Nürnberg", "Dresden", "Hannover", "Bremen", "Münster",
           "Freiburg im Breisgau", "Würzburg", "Lübeck", "Wien", "Zürich", "Graz", "Basel"],
    "fr": ["Paris", "Lyon", "Marseille", "Toulouse", "Nantes", "Bordeaux", "Lille",
           "Strasbourg", "Montpellier", "Rennes", "Nice", "Grenoble", "Dijon", "Angers",
           "Reims", "Bruxelles", "Genève", "Lausanne", "Liège", "Aix-en-Provence"],
}
FOREIGN_CITIES = ["Barcelona", "Lisbon", "Bangkok", "Istanbul", "Marrakesh", "Prague",
                  "Dubai", "Reykjavík", "Kraków", "Tokyo", "Cancún", "Athens"]
US_CITIES = ["Austin, TX", "Seattle, WA", "Chicago, IL", "Boston, MA", "Denver, CO",
             "Portland, OR", "Miami, FL", "Brooklyn, NY"]
IN_CITIES = ["Bengaluru", "Mumbai", "Pune", "Hyderabad", "Chennai", "New Delhi", "Kochi"]
STREETS = {
    "en": ["Albert Road", "Station Road", "Church Lane", "Victoria Street", "Maple Avenue",
           "Oak Street", "High Street", "Park Lane"],
    "de": ["Hauptstraße", "Bahnhofstraße", "Gartenweg", "Schillerstraße", "Goethestraße",
           "Am Marktplatz", "Lindenallee", "Mühlenweg", "Königstraße", "Friedrichstraße"],
    "fr": ["rue de la Paix", "avenue Victor Hugo", "boulevard Saint-Michel", "rue des Lilas",
           "impasse des Roses", "place Bellecour", "chemin du Moulin", "rue Émile Zola"],
}
FREE_MAIL = {
    "en": ["gmail.com", "outlook.com", "yahoo.co.uk", "btinternet.com", "hotmail.com",
           "icloud.com", "proton.me", "rediffmail.com", "yahoo.in"],
    "de": ["web.de", "gmx.de", "gmx.net", "t-online.de", "posteo.de", "mailbox.org",
           "freenet.de", "gmail.com", "gmx.at", "bluewin.ch"],
    "fr": ["orange.fr", "free.fr", "laposte.net", "sfr.fr", "wanadoo.fr", "gmail.com",
           "hotmail.fr", "yahoo.fr", "skynet.be"],
}
COMPANY_TLDS = {"en": ["com", "co.uk", "io", "in", "org"], "de": ["de", "de", "com", "at", "ch", "eu"],
                "fr": ["fr", "fr", "com", "be", "ch", "eu"]}
ROLE_MAILBOXES = {"en": ["support", "billing", "accounts", "hr", "info", "sales", "noreply"],
                  "de": ["info", "rechnung", "buchhaltung", "kontakt", "personal", "service"],
                  "fr": ["contact", "compta", "facturation", "rh", "service.client", "info"]}
LEGAL_FORMS = {"gmbh", "ag", "kg", "ek", "e.k.", "ltd", "plc", "llp", "inc", "inc.", "pvt",
               "sarl", "sas", "sa", "associes", "associés"}
MONTHS = {
    "en": ["January", "February", "March", "April", "May", "June", "July", "August",
           "September", "October", "November", "December"],
    "de": ["Januar", "Februar", "März", "April", "Mai", "Juni", "Juli", "August", "September",
           "Oktober", "November", "Dezember"],
    "fr": ["janvier", "février", "mars", "avril", "mai", "juin", "juillet", "août",
           "septembre", "octobre", "novembre", "décembre"],
}


def slug(company: str) -> str:
    words = [w for w in fold(company).lower().replace("-", " ").split()
             if w not in LEGAL_FORMS and w != "e.k"]
    return "-".join(words[:3]) or "firma"


# ============================================================================================
# EMAIL -- PII.md: local part of [A-Za-z0-9._%+-] starting alnum, no "..", domain labels
# 1-63 bytes without leading/trailing "-", TLD >= 2 letters; a sentence's trailing "." is not
# part of the span.
# ============================================================================================

def gen_email(doc: "Doc", idx: int) -> str:
    rng = doc.rng
    person = doc.person(idx)
    f, l = fold(person[0]).lower().replace(" ", ""), fold(person[1]).lower().replace(" ", "")
    if rng.random() < 0.15:
        local = rng.choice(ROLE_MAILBOXES[doc.lang])
    else:
        local = rng.choice([f"{f}.{l}", f"{f[0]}.{l}", f"{f}{l}", f"{f}_{l}", f"{l}.{f}",
                            f"{f}.{l}+{rng.choice(['invoices', 'news', 'work', 'shop'])}",
                            f"{f}{rng.randint(1, 99)}", f"{f[0]}{l}", f"{f}-{l}"])
    if rng.random() < 0.5:
        domain = rng.choice(FREE_MAIL[doc.lang])
    else:
        domain = f"{slug(doc.company(idx))}.{rng.choice(COMPANY_TLDS[doc.lang])}"
        if rng.random() < 0.15:
            domain = rng.choice(["mail.", "corp.", "eu."]) + domain
    value = f"{local}@{domain}"
    if rng.random() < 0.05:
        value = value[0].upper() + value[1:]
    return value


def email_ok(v: str) -> bool:
    local, _, domain = v.partition("@")
    labels = domain.split(".")
    return (0 < len(local) <= 64 and re.fullmatch(r"[A-Za-z0-9._%+-]+", local) is not None
            and local[0].isalnum() and local[-1] != "." and ".." not in local
            and len(labels) >= 2 and re.fullmatch(r"[A-Za-z]{2,}", labels[-1]) is not None
            and all(re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?", x)
                    for x in labels))


def neg_email(doc: "Doc", idx: int) -> str:
    """PII.md EMAIL "is not": no dot in the domain, "..", a label starting with "-"."""
    rng = doc.rng
    f, l = (fold(x).lower().replace(" ", "") for x in doc.person(idx))
    return rng.choice([
        f"{rng.choice(['root', 'admin', 'postgres', f])}@localhost",
        f"{f}..{l}@{rng.choice(FREE_MAIL[doc.lang])}",
        f"{rng.choice(['info', f])}@-{slug(doc.company(idx))}-.com",
    ])


# ============================================================================================
# PHONE -- PII.md: E.164/international (8-15 digits, "(0)" trunk allowed), US (same separator
# throughout, area and exchange 2-9), UK, DE, FR, IN national formats.
# ============================================================================================

US_AREAS = ["201", "202", "206", "212", "213", "305", "312", "415", "503", "512", "617",
            "646", "702", "718", "773", "808", "917"]
DE_AREAS = ["030", "040", "089", "069", "0221", "0211", "0711", "0341", "0911", "0351",
            "0511", "0421", "0231", "0761"]
DE_MOBILE = ["0151", "0152", "0157", "0159", "0160", "0162", "0163", "0170", "0171", "0172",
             "0173", "0175", "0176", "0177", "0178", "0179"]
UK_CITY = ["0113", "0114", "0115", "0116", "0117", "0118", "0121", "0131", "0141", "0151",
           "0161", "0191"]


def us_parts(rng):
    return rng.choice(US_AREAS), nonzero(rng, "2") + digits(rng, 2), digits(rng, 4)


def phone_us(rng):
    a, e, n = us_parts(rng)
    return rng.choice([f"{a}-{e}-{n}", f"({a}) {e}-{n}", f"1-{a}-{e}-{n}", f"{a}.{e}.{n}",
                       f"{a}-{e}-{n}", f"({a}) {e}-{n}"])


def phone_uk(rng, mobile=False):
    if mobile or rng.random() < 0.4:
        m = "7" + digits(rng, 3)
        return rng.choice([f"0{m} {digits(rng, 6)}", f"0{m}{digits(rng, 6)}",
                           f"0{m} {digits(rng, 3)} {digits(rng, 3)}"])
    return rng.choice([f"020 {rng.choice('378')}{digits(rng, 3)} {digits(rng, 4)}",
                       f"{rng.choice(UK_CITY)} {nonzero(rng, '2')}{digits(rng, 2)} {digits(rng, 4)}",
                       f"01632 {nonzero(rng, '2')}{digits(rng, 5)}"])


def in_mobile(rng):
    return rng.choice("6789") + digits(rng, 4), digits(rng, 5)


def phone_in(rng):
    a, b = in_mobile(rng)
    return rng.choice([f"{a} {b}", f"0{a} {b}", f"91 {a} {b}", f"0{a}{b}", f"{a} {b}",
                       f"91-{a}-{b}"])


def phone_de(rng, mobile=False):
    if mobile or rng.random() < 0.35:
        pre, sub = rng.choice(DE_MOBILE), nonzero(rng) + digits(rng, rng.choice([6, 7]))
        return rng.choice([f"{pre} {sub}", f"{pre} {sub}", f"{pre}/{sub}", f"{pre}{sub}"])
    area = rng.choice(DE_AREAS)
    n = rng.randint(10 - len(area), 11 - len(area))
    sub = nonzero(rng, "2") + digits(rng, n - 1)
    r = rng.random()
    if r < 0.15 and n >= 6:
        return f"{area} {sub[:-2]}-{sub[-2:]}"
    return f"{area}{rng.choice([' ', ' ', ' ', '/', '-'])}{sub}"


def fr_pairs(rng, first: str, sep: str) -> str:
    return sep.join(["0" + first] + [digits(rng, 2) for _ in range(4)])


def phone_fr(rng, mobile=False):
    if mobile or rng.random() < 0.45:
        first = rng.choice("67")
        return rng.choice([fr_pairs(rng, first, " "), fr_pairs(rng, first, " "),
                           fr_pairs(rng, first, "."), fr_pairs(rng, first, ""),
                           fr_pairs(rng, first, "-")])
    first = rng.choice("123459")
    return rng.choice([fr_pairs(rng, first, " "), fr_pairs(rng, first, " "),
                       fr_pairs(rng, first, ".")])


def phone_intl(rng, country: str | None = None) -> str:
    """E.164 and international formats (PII.md: 8-15 digits, a "(0)" trunk not counted)."""
    c = country or rng.choice(["1", "44", "91", "49", "33", "41", "43", "32", "34", "39",
                               "31", "353", "61", "971", "65"])
    if c == "1":
        a, e, n = us_parts(rng)
        return rng.choice([f"+1 {a} {e} {n}", f"+1{a}{e}{n}", f"+1-{a}-{e}-{n}",
                           f"+1 ({a}) {e}-{n}"])
    if c == "44":
        return rng.choice([f"+44 20 {rng.choice('378')}{digits(rng, 3)} {digits(rng, 4)}",
                           f"+44 (0)20 {rng.choice('378')}{digits(rng, 3)} {digits(rng, 4)}",
                           f"+44 7{digits(rng, 3)} {digits(rng, 6)}", f"+447{digits(rng, 9)}",
                           f"+44 161 {nonzero(rng, '2')}{digits(rng, 2)} {digits(rng, 4)}"])
    if c == "91":
        a, b = in_mobile(rng)
        return rng.choice([f"+91 {a} {b}", f"+91{a}{b}", f"+91-{a}-{b}"])
    if c == "49":
        area = rng.choice(DE_AREAS)[1:]
        mob = rng.choice(DE_MOBILE)[1:]
        return rng.choice([f"+49 {area} {nonzero(rng, '2')}{digits(rng, 10 - len(area))}",
                           f"+49 (0){area} {nonzero(rng, '2')}{digits(rng, 9 - len(area))}",
                           f"+49 {mob} {nonzero(rng)}{digits(rng, 7)}",
                           f"+49{mob}{nonzero(rng)}{digits(rng, 6)}"])
    if c == "33":
        first = rng.choice("12345967")
        pairs = " ".join(digits(rng, 2) for _ in range(4))
        return rng.choice([f"+33 {first} {pairs}", f"+33 (0){first} {pairs}",
                           f"+33{rng.choice('67')}{digits(rng, 8)}", f"+33 {first} {pairs}"])
    return {
        "41": lambda: f"+41 {rng.choice(['44', '22', '31', '79', '76'])} {digits(rng, 3)} "
                      f"{digits(rng, 2)} {digits(rng, 2)}",
        "43": lambda: rng.choice([f"+43 1 {nonzero(rng)}{digits(rng, 6)}",
                                  f"+43 664 {nonzero(rng)}{digits(rng, 6)}"]),
        "32": lambda: rng.choice([f"+32 2 {digits(rng, 3)} {digits(rng, 2)} {digits(rng, 2)}",
                                  f"+32 47{digits(rng, 1)} {digits(rng, 2)} {digits(rng, 2)} "
                                  f"{digits(rng, 2)}"]),
        "34": lambda: f"+34 9{digits(rng, 2)} {digits(rng, 3)} {digits(rng, 3)}",
        "39": lambda: f"+39 06 {digits(rng, 4)} {digits(rng, 4)}",
        "31": lambda: f"+31 20 {digits(rng, 3)} {digits(rng, 4)}",
        "353": lambda: f"+353 1 {digits(rng, 3)} {digits(rng, 4)}",
        "61": lambda: f"+61 2 {digits(rng, 4)} {digits(rng, 4)}",
        "971": lambda: f"+971 4 {digits(rng, 3)} {digits(rng, 4)}",
        "65": lambda: f"+65 {rng.choice('689')}{digits(rng, 3)} {digits(rng, 4)}",
    }[c]()


def gen_phone(doc: "Doc", idx: int) -> str:
    rng, r = doc.rng, doc.rng.random()
    if doc.lang == "en":
        if r < 0.32:
            return phone_us(rng)
        if r < 0.60:
            return phone_uk(rng)
        if r < 0.80:
            return phone_in(rng)
        return phone_intl(rng)
    if doc.lang == "de":
        if r < 0.68:
            return phone_de(rng)
        if r < 0.92:
            return phone_intl(rng, rng.choice(["49", "49", "49", "43", "41"]))
        return phone_intl(rng)
    if r < 0.66:
        return phone_fr(rng)
    if r < 0.90:
        return phone_intl(rng, rng.choice(["33", "33", "33", "32", "41"]))
    return phone_intl(rng)


def gen_mobile(doc: "Doc", idx: int) -> str:
    rng, r = doc.rng, doc.rng.random()
    if doc.lang == "en":
        if r < 0.35:
            return phone_uk(rng, mobile=True)
        if r < 0.6:
            return phone_us(rng)
        if r < 0.85:
            return phone_in(rng)
        return phone_intl(rng, rng.choice(["44", "1", "91"]))
    if doc.lang == "de":
        if r < 0.75:
            return phone_de(rng, mobile=True)
        return rng.choice([f"+49 {rng.choice(DE_MOBILE)[1:]} {nonzero(rng)}{digits(rng, 7)}",
                           f"+49{rng.choice(DE_MOBILE)[1:]}{nonzero(rng)}{digits(rng, 6)}"])
    if r < 0.75:
        return phone_fr(rng, mobile=True)
    return rng.choice([f"+33 {rng.choice('67')} " + " ".join(digits(rng, 2) for _ in range(4)),
                       f"+33{rng.choice('67')}{digits(rng, 8)}"])


def gen_phone_intl(doc: "Doc", idx: int) -> str:
    return phone_intl(doc.rng)


def gen_phone_in(doc: "Doc", idx: int) -> str:
    return phone_in(doc.rng) if doc.rng.random() < 0.7 else phone_intl(doc.rng, "91")


def neg_phone(doc: "Doc", idx: int) -> str:
    """PII.md PHONE "is not": bare US 4155552671, area starting 0/1, mixed separators, bare UK
    non-mobile, bare FR landline, bare IN 9876543210, +1234567 (too short)."""
    rng = doc.rng
    a, e, n = us_parts(rng)
    short = {"en": f"+44 20 {digits(rng, 3)}", "de": f"+49 30 {digits(rng, 3)}",
             "fr": f"+33 1 {digits(rng, 2)} {digits(rng, 2)}"}[doc.lang]
    fr_landline = "0" + rng.choice("12345") + digits(rng, 8)
    if doc.lang == "en":
        area01 = rng.choice("01") + digits(rng, 2)
        uk_bare = rng.choice(["020", "0113", "0121", "0131", "0141", "0191", "029"])
        uk_bare += digits(rng, 11 - len(uk_bare))
        return rng.choice([f"{a}{e}{n}", f"{area01}-{e}-{n}", f"{a}-{e}.{n}", f"{a}.{e}-{n}",
                           uk_bare, rng.choice("6789") + digits(rng, 9), short,
                           rng.choice("6789") + digits(rng, 9)])
    return rng.choice([short, fr_landline, fr_landline])


# ============================================================================================
# CARD -- PII.md: 12-19 digits in a current brand range, Luhn-valid, bare or grouped by one
# kind of separator (space or dash).
# ============================================================================================

CARD_BRANDS = [  # (weight, prefix chooser, lengths)
    (30, lambda r: "4", [16, 16, 16, 16, 13, 19]),
    (14, lambda r: str(r.randint(51, 55)), [16]),
    (8, lambda r: str(r.randint(2221, 2720)), [16]),
    (9, lambda r: r.choice(["34", "37"]), [15]),
    (6, lambda r: r.choice(["6011", str(r.randint(644, 649)), "65",
                            str(r.randint(622126, 622925))]), [16, 16, 16, 19]),
    (5, lambda r: str(r.randint(3528, 3589)), [16, 16, 19]),
    (4, lambda r: r.choice([str(r.randint(300, 305)), "3095", "36", "38", "39"]), [14, 14, 16]),
    (3, lambda r: str(r.randint(2200, 2204)), [16]),
    (4, lambda r: r.choice(["62", "81"]), [16, 16, 19]),
    (4, lambda r: r.choice(["60", "82", "508", "6521", "6522"]), [16]),
    (2, lambda r: str(r.choice([r.randint(506099, 506198), r.randint(650002, 650027)])),
     [16, 19]),
    (4, lambda r: r.choice(["5018", "5020", "5038", "5893", "6304", "6759", "6761", "6762",
                            "6763"]), [16, 12, 19]),
]

GROUPINGS = {16: [4, 4, 4, 4], 19: [4, 4, 4, 4, 3], 15: [4, 6, 5], 14: [4, 6, 4],
             12: [4, 4, 4]}


def card_number(rng) -> str:
    _, prefix, lengths = rng.choices(CARD_BRANDS, weights=[b[0] for b in CARD_BRANDS])[0]
    p, n = prefix(rng), rng.choice(lengths)
    number = luhn_complete(p + digits(rng, n - len(p) - 1))
    assert card_brand(number), number
    return number


def format_card(rng, number: str, bare_p: float = 0.35) -> str:
    if len(number) not in GROUPINGS or rng.random() < bare_p:
        return number
    return group(number, GROUPINGS[len(number)], rng.choice([" ", " ", " ", "-"]))


def gen_card(doc: "Doc", idx: int) -> str:
    return format_card(doc.rng, card_number(doc.rng))


def card_ok(v: str) -> bool:
    d = re.sub(r"[ -]", "", v)
    seps = set(re.sub(r"[0-9]", "", v))
    return (len(seps) <= 1 and d.isdigit() and 12 <= len(d) <= 19 and card_brand(d) is not None
            and luhn_ok(d))


def neg_card(doc: "Doc", idx: int) -> str:
    """PII.md CARD "is not": Luhn failures, unknown ranges, mixed separators (and lengths no
    brand has)."""
    rng = doc.rng
    kind = rng.choice(["luhn", "luhn", "luhn", "range", "mixed", "length"])
    if kind == "luhn":
        good = card_number(rng)
        bad = good[:-1] + str((int(good[-1]) + rng.randint(1, 9)) % 10)
        return format_card(rng, bad)
    if kind == "range":
        p = rng.choice(["1", "7", "9", "56", "57", "58", "29"])
        return format_card(rng, luhn_complete(p + digits(rng, 15 - len(p))))
    if kind == "mixed":
        while True:
            good = card_number(rng)
            if len(good) in (15, 16, 19):
                break
        sizes = GROUPINGS[len(good)]
        parts = group(good, sizes, " ").split(" ")
        seps = [rng.choice(" -") for _ in parts[1:]]
        if len(set(seps)) == 1:
            seps[rng.randrange(len(seps))] = "-" if seps[0] == " " else " "
        return parts[0] + "".join(s + p for s, p in zip(seps, parts[1:]))
    p = rng.choice(["34", "37", "4", "51", "53"])
    n = 16 if p.startswith("3") else 15
    return format_card(rng, luhn_complete(p + digits(rng, n - len(p) - 1)))


def neg_card_ok(v: str) -> bool:
    return not card_ok(v)


# ============================================================================================
# SSN -- PII.md: 123-45-6789 or 123 45 6789; not area 000/666/900-999, group 00, serial 0000;
# bare nine digits are not an SSN.
# ============================================================================================

def gen_ssn(doc: "Doc", idx: int) -> str:
    rng = doc.rng
    area = rng.choice([a for a in range(1, 900) if a != 666])
    d = f"{area:03d}{rng.randint(1, 99):02d}{rng.randint(1, 9999):04d}"
    return group(d, [3, 2, 4], "-" if rng.random() < 0.8 else " ")


def ssn_value_ok(v: str) -> bool:
    return re.fullmatch(r"\d{3}(-\d{2}-|\ \d{2}\ )\d{4}", v) is not None and ssn_ok(
        v.replace("-", "").replace(" ", ""))


def neg_ssn(doc: "Doc", idx: int) -> str:
    rng = doc.rng
    area, grp, serial = rng.randint(1, 899), rng.randint(1, 99), rng.randint(1, 9999)
    area = 667 if area == 666 else area
    kind = rng.choice(["000", "666", "9xx", "00", "0000", "bare"])
    if kind == "000":
        area = 0
    elif kind == "666":
        area = 666
    elif kind == "9xx":
        area = rng.randint(900, 999)
    elif kind == "00":
        grp = 0
    elif kind == "0000":
        serial = 0
    d = f"{area:03d}{grp:02d}{serial:04d}"
    if kind == "bare":
        return d
    return group(d, [3, 2, 4], "-" if rng.random() < 0.8 else " ")


def neg_ssn_ok(v: str) -> bool:
    return not ssn_value_ok(v)


# ============================================================================================
# IBAN -- PII.md: upper case, bare or in groups of four, length per listed country, mod-97 = 1.
# ============================================================================================

IBAN_COUNTRIES = {
    "en": (["GB", "IE", "DE", "NL", "ES", "IT", "FR", "PL", "PT"], [35, 10, 15, 10, 10, 8, 5, 4, 3]),
    "de": (["DE", "AT", "CH", "NL", "BE", "IT", "ES", "PL"], [60, 15, 12, 4, 3, 2, 2, 2]),
    "fr": (["FR", "BE", "CH", "LU", "ES", "IT", "DE", "PT"], [58, 14, 10, 5, 4, 4, 3, 2]),
}


def bban(rng, country: str) -> str:
    out = []
    for n, kind in re.findall(r"(\d+)([nac])", BBAN[country]):
        n = int(n)
        if kind == "n":
            out.append(digits(rng, n))
        elif kind == "a" and n == 4 and country in BANK_CODES:
            out.append(rng.choice(BANK_CODES[country]))
        elif kind == "a":
            out.append(chars(rng, UPPER, n))
        else:
            out.append("".join(rng.choice(UPPER) if rng.random() < 0.1 else rng.choice(DIGITS)
                               for _ in range(n)))
    return "".join(out)


def group4(compact: str) -> str:
    return " ".join(compact[i:i + 4] for i in range(0, len(compact), 4))


def iban_compact(doc: "Doc") -> str:
    countries, weights = IBAN_COUNTRIES[doc.lang]
    country = doc.rng.choices(countries, weights=weights)[0]
    return with_check_digits(country, bban(doc.rng, country))


def gen_iban(doc: "Doc", idx: int) -> str:
    compact = iban_compact(doc)
    return group4(compact) if doc.rng.random() < 0.55 else compact


def neg_iban(doc: "Doc", idx: int) -> str:
    """PII.md IBAN "is not": bad check digits, wrong length for a listed country, irregular
    grouping."""
    rng = doc.rng
    good = iban_compact(doc)
    kind = rng.choice(["check", "check", "typo", "length", "grouping"])
    if kind == "check":
        cc = int(good[2:4])
        new = rng.choice([c for c in range(2, 99) if (c - cc) % 97 != 0])
        bad = f"{good[:2]}{new:02d}{good[4:]}"
    elif kind == "typo":
        i = rng.choice([i for i in range(4, len(good)) if good[i].isdigit()])
        bad = good[:i] + str((int(good[i]) + rng.randint(1, 9)) % 10) + good[i + 1:]
    elif kind == "length":
        b = good[4:]
        b = b[:-1] if rng.random() < 0.6 else b + digits(rng, 1)
        bad = with_check_digits(good[:2], b)
    else:
        body = good[4:]
        cut = rng.choice([[8], [3, 3, 3], [5, 5, 5], [10]])
        parts, i = [good[:4]], 0
        while i < len(body):
            n = cut[len(parts) % len(cut)]
            parts.append(body[i:i + n])
            i += n
        return " ".join(parts)
    return group4(bad) if rng.random() < 0.5 else bad


def neg_iban_ok(v: str) -> bool:
    return not iban_ok(v)


# ============================================================================================
# IP -- PII.md: IPv4 that std::net parses (private and loopback included) unless part of a
# longer dotted number; IPv6 that parses, not touching a word character or ":", <= 45 bytes.
# ============================================================================================

def gen_ipv4_public(doc: "Doc", idx: int) -> str:
    rng = doc.rng
    if rng.random() < 0.3:
        return rng.choice(["203.0.113.", "198.51.100.", "192.0.2."]) + str(rng.randint(1, 254))
    a = rng.choice([x for x in range(1, 224) if x not in (10, 127, 169, 172, 192)])
    return f"{a}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}"


def gen_ipv4_private(doc: "Doc", idx: int) -> str:
    rng = doc.rng
    return rng.choice([
        f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"172.{rng.randint(16, 31)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"192.168.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"10.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        "127.0.0.1",
    ])


def gen_ipv4(doc: "Doc", idx: int) -> str:
    return gen_ipv4_public(doc, idx) if doc.rng.random() < 0.6 else gen_ipv4_private(doc, idx)


def gen_ipv6(doc: "Doc", idx: int) -> str:
    rng = doc.rng
    kind = rng.choice(["doc", "doc", "global", "global", "link", "loop", "mapped", "full"])
    if kind == "loop":
        return "::1"
    if kind == "mapped":
        return "::ffff:" + gen_ipv4_public(doc, idx)
    if kind == "link":
        return "fe80::" + ":".join(f"{rng.getrandbits(16):x}" for _ in range(rng.randint(1, 4)))
    groups = [0x2001, 0xdb8] if kind == "doc" else [rng.choice([0x2a02, 0x2a01, 0x2600, 0x2c0f,
                                                                0x2001, 0x2a00]),
                                                    rng.getrandbits(16)]
    groups += [rng.getrandbits(16) if rng.random() < 0.5 else 0 for _ in range(6)]
    addr = ipaddress.IPv6Address(":".join(f"{g:x}" for g in groups))
    return addr.exploded if kind == "full" else addr.compressed


def gen_ip(doc: "Doc", idx: int) -> str:
    return gen_ipv4(doc, idx) if doc.rng.random() < 0.7 else gen_ipv6(doc, idx)


def ip_ok(v: str) -> bool:
    try:
        if ":" in v:
            ipaddress.IPv6Address(v)
            return len(v) <= 45
        ipaddress.IPv4Address(v)
        return True
    except ValueError:
        return False


def neg_ipv4(doc: "Doc", idx: int) -> str:
    """PII.md IP "is not": 1.2.3.4.5 (part of a dotted version), 256.1.1.1, 01.2.3.4."""
    rng = doc.rng
    return rng.choice([
        f"{rng.randint(256, 999)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}",
        f"10.{rng.randint(0, 255)}.{rng.randint(256, 999)}.{rng.randint(1, 254)}",
        f"192.168.0{rng.randint(1, 9)}.{rng.randint(1, 254)}",
        f"0{rng.randint(1, 9)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 9)}",
        ".".join(str(rng.randint(0, 20)) for _ in range(5)),
    ])


def neg_ipv6(doc: "Doc", idx: int) -> str:
    """PII.md IPv6 "is not": 12:30:45, a MAC address, std::vec, a bare "::"."""
    rng = doc.rng
    return rng.choice([
        ":".join(f"{rng.getrandbits(8):02x}" for _ in range(6)),
        ":".join(f"{rng.getrandbits(8):02X}" for _ in range(6)),
        f"{rng.randint(0, 23):02d}:{rng.randint(0, 59):02d}:{rng.randint(0, 59):02d}",
    ])


def neg_ip(doc: "Doc", idx: int) -> str:
    return neg_ipv4(doc, idx) if doc.rng.random() < 0.7 else neg_ipv6(doc, idx)


def neg_ip_ok(v: str) -> bool:
    return not ip_ok(v) or len(v.split(".")) > 4


# ============================================================================================
# SECRET -- PII.md: OpenAI (sk-, sk-proj-, sk-svcacct-, sk-admin- + >= 20 token bytes with a
# digit, an upper- and a lower-case letter), Anthropic (sk-ant-api03-/sk-ant-admin01- + >= 32),
# AWS access key ids, GitHub tokens, Stripe sk_/rk_ keys, Slack xox tokens (>= 4 digits), JWTs
# whose header has "alg", PEM private key blocks (not certificates or public keys).
# ============================================================================================

def openai_key(rng) -> str:
    kind = rng.choice(["legacy", "proj", "proj", "svcacct", "admin"])
    if kind == "legacy":
        return f"sk-{token(rng, 20)}T3BlbkFJ{token(rng, 20)}"
    n = rng.randint(40, 74)
    body = f"{token(rng, n, ALNUM + '-_')}T3BlbkFJ{token(rng, n, ALNUM + '-_')}"
    return f"sk-{kind}-{body}"


def anthropic_key(rng) -> str:
    kind = rng.choice(["api03", "api03", "api03", "admin01"])
    return f"sk-ant-{kind}-{token(rng, 93, ALNUM + '-_')}AA"


def aws_key_id(rng) -> str:
    return rng.choice(["AKIA", "AKIA", "AKIA", "ASIA"]) + chars(rng, UPPER + "234567", 16)


def github_token(rng) -> str:
    if rng.random() < 0.25:
        return f"github_pat_{token(rng, 22)}_{token(rng, 59)}"
    return f"gh{rng.choice('pousr')}_{token(rng, 36)}"


def stripe_key(rng) -> str:
    prefix = rng.choice(["sk_live_", "sk_live_", "rk_live_", "sk_test_", "rk_test_"])
    return prefix + token(rng, rng.choice([24, 24, 99]))


def slack_token(rng) -> str:
    if rng.random() < 0.6:
        return (f"xox{rng.choice('bba')}-{nonzero(rng)}{digits(rng, rng.randint(9, 12))}-"
                f"{nonzero(rng)}{digits(rng, 12)}-{token(rng, 24)}")
    return (f"xox{rng.choice('prs')}-{nonzero(rng)}{digits(rng, 10)}-{nonzero(rng)}{digits(rng, 11)}-"
            f"{nonzero(rng)}{digits(rng, 12)}-{chars(rng, HEX, 31)}{rng.choice('abcdef')}")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def jwt(doc: "Doc") -> str:
    rng = doc.rng
    alg = rng.choice(["HS256", "HS256", "RS256", "ES256", "HS512"])
    header = rng.choice([{"alg": alg, "typ": "JWT"}, {"typ": "JWT", "alg": alg},
                         {"alg": alg, "kid": chars(rng, HEX, 16), "typ": "JWT"}])
    now = rng.randint(1_690_000_000, 1_760_000_000)
    first, last = doc.person(1)
    payload = {"sub": str(rng.randint(10_000, 9_999_999)), "name": f"{first} {last}",
               "iat": now, "exp": now + rng.choice([900, 3600, 86400])}
    if rng.random() < 0.5:
        payload["iss"] = f"https://auth.{slug(doc.company(1))}.com/"
    if rng.random() < 0.4:
        payload["scope"] = rng.choice(["read:orders", "openid profile", "admin"])
    sig_len = {"HS256": 32, "HS512": 64, "RS256": 256, "ES256": 64}[alg]
    enc = lambda o: b64url(json.dumps(o, separators=(",", ":"), ensure_ascii=False).encode())
    return f"{enc(header)}.{enc(payload)}.{b64url(rng.randbytes(sig_len))}"


PEM_KINDS = [  # (label, DER-ish prefix of the base64 body, random body bytes, line width)
    ("RSA PRIVATE KEY", "MIIEowIBAAKCAQEA", 1180, 64),
    ("RSA PRIVATE KEY", "MIICXAIBAAKBgQC", 600, 64),
    ("PRIVATE KEY", "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQ", 1180, 64),
    ("EC PRIVATE KEY", "MHcCAQEEI", 112, 64),
    ("OPENSSH PRIVATE KEY", "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW", 330, 70),
    ("ENCRYPTED PRIVATE KEY", "MIIFHDBOBgkqhkiG9w0BBQ0wQTApBgkqhkiG9w0BBQwwHAQI", 1250, 64),
    ("DSA PRIVATE KEY", "MIIBuwIBAAKBgQ", 420, 64),
    ("PGP PRIVATE KEY BLOCK", "lQOYBG", 900, 64),
]


def pem_block(rng, indent: str = "") -> str:
    label, prefix, n, width = rng.choice(PEM_KINDS)
    body = prefix + base64.b64encode(rng.randbytes(n)).decode()
    lines = [body[i:i + width] for i in range(0, len(body), width)]
    head = [f"-----BEGIN {label}-----"]
    # Encryption headers only unindented: the implementation accepts at most two whitespace
    # bytes before "Proc-Type"/"DEK-Info" (PII.md is silent on this; see the report).
    if label == "RSA PRIVATE KEY" and not indent and rng.random() < 0.25:
        head += ["Proc-Type: 4,ENCRYPTED",
                 f"DEK-Info: AES-128-CBC,{chars(rng, '0123456789ABCDEF', 32)}", ""]
    if label.startswith("PGP"):
        head.append("")
        lines.append("=" + chars(rng, B64, 4))
    text = "\n".join(head + lines + [f"-----END {label}-----"])
    return text.replace("\n", "\n" + indent)


def truncated_pem(rng) -> str:
    """A paste cut off before the footer: PII.md labels the header plus the body run. The
    caller puts a character outside the body class ("…") or the end of text right after."""
    label, prefix, n, width = rng.choice(PEM_KINDS[:4])
    body = prefix + base64.b64encode(rng.randbytes(n)).decode()
    lines = [body[i:i + width] for i in range(0, len(body), width)]
    return "\n".join([f"-----BEGIN {label}-----"] + lines[:rng.randint(2, 5)])


def gen_openai(doc, idx):
    return openai_key(doc.rng)


def gen_anthropic(doc, idx):
    return anthropic_key(doc.rng)


def gen_aws(doc, idx):
    return aws_key_id(doc.rng)


def gen_github(doc, idx):
    return github_token(doc.rng)


def gen_stripe(doc, idx):
    return stripe_key(doc.rng)


def gen_slack(doc, idx):
    return slack_token(doc.rng)


def gen_jwt(doc, idx):
    return jwt(doc)


def gen_pem(doc, idx):
    return pem_block(doc.rng)


def gen_pem_yaml(doc, idx):  # a key inside a YAML block scalar, indented by four spaces
    return pem_block(doc.rng, indent="    ")


def gen_secret(doc, idx):
    return doc.rng.choice([openai_key, anthropic_key, aws_key_id, github_token, stripe_key,
                           slack_token])(doc.rng)


NEG_SECRETS = {  # PII.md SECRET "is not" and shapes below a rule's minimum
    "openai": lambda r: r.choice([
        "sk-learn-compatible-estimators-" + r.choice(["for-pipelines", "and-transformers"]),
        "sk-" + "x" * r.choice([32, 48]), "sk-your-api-key-here", "sk-...",
        "sk-proj-" + "X" * r.choice([24, 40])]),
    "anthropic": lambda r: r.choice(["sk-ant-api03-" + token(r, 12), "sk-ant-...",
                                     "sk-ant-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"]),
    "aws": lambda r: "AKIA" + chars(r, UPPER + "234567", 15),
    "github": lambda r: r.choice(["ghp_" + token(r, 20), "ghp_xxxxxxxxxxxx", "github_pat_..."]),
    "stripe": lambda r: r.choice(["sk_live_" + r.choice(["yourstripesecretkeyhere",
                                                         "replacewithyourownkey"]),
                                  "sk_test_" + "x" * 24, "pk_live_..."]),
    "slack": lambda r: r.choice(["xoxb-your-bot-token-here", "xoxp-your-user-token",
                                 "xoxb-not-a-real-token"]),
    "jwt": lambda r: ".".join([b64url(b'{"typ":"JWT"}'),
                               b64url(json.dumps({"sub": str(r.randint(1, 99999))}).encode()),
                               b64url(r.randbytes(32))]),
    "pem": lambda r: r.choice([
        "-----BEGIN CERTIFICATE-----\n" + "\n".join(
            base64.b64encode(r.randbytes(48)).decode() for _ in range(r.randint(3, 8)))
        + "\n-----END CERTIFICATE-----",
        "-----BEGIN PUBLIC KEY-----\nMIIBIjANBgkqhkiG9w0BAQEFAAOCAQ8AMIIBCgKCAQEA"
        + base64.b64encode(r.randbytes(15)).decode() + "\n"
        + "\n".join(base64.b64encode(r.randbytes(48)).decode() for _ in range(4))
        + "\n-----END PUBLIC KEY-----",
        "-----BEGIN RSA PRIVATE KEY-----\n<redacted>\n-----END RSA PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----\n...\n-----END OPENSSH PRIVATE KEY-----"]),
}


def neg_secret_of(kind):
    return lambda doc, idx: NEG_SECRETS[kind](doc.rng)


def neg_secret(doc, idx):
    return NEG_SECRETS[doc.rng.choice(["openai", "anthropic", "aws", "github", "stripe",
                                       "slack"])](doc.rng)


SECRET_SHAPES = [
    r"sk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_-]{20,}",
    r"sk-ant-(?:api|admin)\d\d-[A-Za-z0-9_-]{32,}",
    r"(?:AKIA|ASIA)[A-Z0-9]{16}",
    r"gh[pousr]_[A-Za-z0-9]{36}|github_pat_[A-Za-z0-9_]{82}",
    r"(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{20,247}",
    r"xox[baprs]-[A-Za-z0-9-]{10,}",
    r"eyJ[A-Za-z0-9_-]+\.[A-Za-z0-9_-]{2,}\.[A-Za-z0-9_-]*",
    r"(?s)-----BEGIN (?:[A-Z0-9]{1,10} ){0,2}PRIVATE KEY(?: BLOCK)?-----.{16,}",
]


def secret_ok(v: str) -> bool:
    return len(v) <= 8425 and any(re.fullmatch(p, v) for p in SECRET_SHAPES)


# ============================================================================================
# Filler: names, places, dates and look-alikes. Fillers in HARD_FILLERS are hard negatives.
# ============================================================================================

def rand_date(rng) -> dt.date:
    return dt.date(2023, 1, 1) + dt.timedelta(days=rng.randint(0, 1000))


def fmt_date(doc, idx):
    d, rng = rand_date(doc.rng), doc.rng
    m = MONTHS[doc.lang][d.month - 1]
    if doc.lang == "en":
        return rng.choice([f"{d.day} {m} {d.year}", f"{m} {d.day}, {d.year}", d.isoformat(),
                           f"{d.day:02d}/{d.month:02d}/{d.year}"])
    if doc.lang == "de":
        return rng.choice([f"{d.day:02d}.{d.month:02d}.{d.year}", f"{d.day}. {m} {d.year}"])
    return rng.choice([f"{d.day:02d}/{d.month:02d}/{d.year}", f"{d.day} {m} {d.year}"])


def fmt_time(doc, idx):
    h, m = doc.rng.randint(7, 20), doc.rng.choice([0, 15, 30, 45, 10, 50])
    return f"{h}h{m:02d}" if doc.lang == "fr" and doc.rng.random() < 0.6 else f"{h}:{m:02d}"


def timestamp(doc, idx):
    """ISO 8601 log timestamps, increasing within a document (one format per document)."""
    t = doc.clock(idx)
    return {0: t.strftime("%Y-%m-%dT%H:%M:%SZ"),
            1: t.strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.microsecond // 1000:03d}Z",
            2: t.strftime("%Y-%m-%d %H:%M:%S,") + f"{t.microsecond // 1000:03d}",
            3: t.strftime("%Y-%m-%dT%H:%M:%S") + doc.rng.choice(["+01:00", "+02:00", "+05:30",
                                                                  "-04:00"]),
            4: t.strftime("%Y-%m-%d %H:%M:%S")}[doc.ts_format]


def rfc2822(doc, idx):
    t = doc.clock(idx)
    days = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"]
    mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    zone = doc.rng.choice(["+0100", "+0200", "+0000", "-0500", "+0530"])
    return (f"{days[t.weekday()]}, {t.day} {mon[t.month - 1]} {t.year} "
            f"{t:%H:%M:%S} {zone}")


def clf_date(doc, idx):
    t = doc.clock(idx)
    mon = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    return f"{t.day:02d}/{mon[t.month - 1]}/{t.year}:{t:%H:%M:%S} +0000"


def amount(doc, idx):
    rng = doc.rng
    v = rng.choice([rng.randint(5, 99) + rng.randint(0, 99) / 100,
                    rng.randint(100, 9999) + rng.choice([0, 0.5, 0.99, 0.25]),
                    float(rng.randint(10, 250) * 100)])
    us = f"{v:,.2f}"
    de = us.replace(",", "X").replace(".", ",").replace("X", ".")
    if doc.lang == "en":
        return rng.choice([f"${us}", f"£{us}", f"€{us}", f"USD {us}", f"₹{int(v):,}"])
    if doc.lang == "de":
        return rng.choice([f"{de} €", f"{de} EUR", f"EUR {de}", f"CHF {us.replace(',', chr(39))}"])
    fr = us.replace(",", "\u202f").replace(".", ",")
    return rng.choice([f"{fr}\u00a0€", f"{fr} €", f"{fr} EUR"])


def order_no(doc, idx):
    rng = doc.rng
    y = rng.randint(2023, 2025)
    return {"en": lambda: rng.choice([f"#{rng.randint(10000, 999999)}",
                                      f"{rng.randint(100, 999)}-{digits(rng, 7)}-{digits(rng, 7)}",
                                      f"ORD-{y}-{digits(rng, 6)}", f"A{nonzero(rng)}{digits(rng, 7)}"]),
            "de": lambda: rng.choice([f"45{digits(rng, 8)}", f"AB-{y}-{digits(rng, 4)}",
                                      f"BE{nonzero(rng)}{digits(rng, 7)}",
                                      f"{nonzero(rng)}{digits(rng, 8)}"]),
            "fr": lambda: rng.choice([f"CMD-{y}-{digits(rng, 6)}", f"{y}{digits(rng, 6)}",
                                      f"FR{digits(rng, 9)}X"])}[doc.lang]()


def invoice_no(doc, idx):
    rng = doc.rng
    y = rng.randint(2023, 2025)
    return {"en": lambda: rng.choice([f"INV-{y}-{digits(rng, 5)}", f"INV{digits(rng, 6)}"]),
            "de": lambda: rng.choice([f"RE-{y}-{digits(rng, 4)}", f"R{y}{digits(rng, 5)}"]),
            "fr": lambda: rng.choice([f"F{y}-{digits(rng, 4)}", f"FA-{digits(rng, 6)}"])}[doc.lang]()


def version(doc, idx):
    rng = doc.rng
    a, b, c = rng.randint(0, 12), rng.randint(0, 40), rng.randint(0, 30)
    return rng.choice([f"{a}.{b}.{c}", f"v{a}.{b}.{c}", f"{a}.{b}.{c}-rc.{rng.randint(1, 5)}",
                       f"10.0.{rng.randint(17000, 22631)}", f"v10.0.{rng.randint(17000, 22631)}",
                       f"10.0.{rng.randint(19041, 19045)}.{rng.randint(1000, 4999)}",
                       f"{a}.{b}.{c}.{rng.randint(1, 9)}.{rng.randint(1, 99)}"])


def tracking(doc, idx):
    rng = doc.rng
    return rng.choice([
        f"1Z{chars(rng, UPPER + DIGITS, 6)}{digits(rng, 10)}",
        f"00340434{digits(rng, 12)}",
        f"{chars(rng, UPPER, 2)}{digits(rng, 9)}GB",
        f"6A{digits(rng, 11)}",
        f"9400 1{digits(rng, 3)} {digits(rng, 4)} {digits(rng, 4)} {digits(rng, 4)} {digits(rng, 2)}",
        f"JJD{digits(rng, 18)}",
    ])


def postcode(doc, idx):
    rng = doc.rng
    if doc.lang == "en":
        return rng.choice([
            f"{rng.choice(['SW1A', 'EC2A', 'M1', 'LS1', 'B3', 'BS8', 'EH1', 'N7'])} "
            f"{nonzero(rng)}{chars(rng, 'ABDEFGHJLNPQRSTUWXYZ', 2)}",
            f"{nonzero(rng)}{digits(rng, 4)}", f"{rng.randint(110001, 600099)}"])
    if doc.lang == "de":
        return f"{rng.randint(1067, 99998):05d}"
    return rng.choice([f"750{rng.randint(1, 20):02d}", f"{rng.randint(1000, 95999):05d}",
                       f"69{rng.randint(1, 9):03d}"])


def ssh_pub(doc, idx):
    return "AAAAC3NzaC1lZDI1NTE5AAAAI" + chars(doc.rng, B64, 43)


def aws_secret(doc, idx):  # PII.md: secret access keys are not detected (no prefix)
    return chars(doc.rng, B64, 40)


def street(doc, idx):
    rng = doc.rng
    s = rng.choice(STREETS[doc.lang])
    n = rng.randint(1, 180)
    return f"{n} {s}" if doc.lang in ("en", "fr") else f"{s} {n}"


def person_part(part):
    def f(doc, idx):
        first, last = doc.person(idx)
        return {"first": first, "last": last, "name": f"{first} {last}"}[part]
    return f


FILLERS = {
    "first": person_part("first"), "last": person_part("last"), "name": person_part("name"),
    "company": lambda d, i: d.company(i),
    "city": lambda d, i: d.city(i),
    "city_foreign": lambda d, i: d.rng.choice(FOREIGN_CITIES),
    "city_us": lambda d, i: d.rng.choice(US_CITIES),
    "city_in": lambda d, i: d.rng.choice(IN_CITIES),
    "street": street,
    "postcode": postcode,
    "zip": lambda d, i: f"{nonzero(d.rng)}{digits(d.rng, 4)}",
    "date": fmt_date, "time": fmt_time,
    "amount": amount,
    "amount_inr": lambda d, i: f"₹{d.rng.randint(200, 90000):,}",
    "order": order_no, "invoice": invoice_no,
    "ticket": lambda d, i: d.rng.choice([f"#{d.rng.randint(10000, 99999)}",
                                         f"SUP-{d.rng.randint(1000, 99999)}",
                                         f"INC{digits(d.rng, 7)}"]),
    "ts": timestamp, "rfc_date": rfc2822, "clf_date": clf_date,
    "unix": lambda d, i: str(d.rng.randint(1_600_000_000, 1_760_000_000)),
    "unix_ms": lambda d, i: str(d.rng.randint(1_600_000_000_000, 1_760_000_000_000)),
    "version": version,
    "uuid": lambda d, i: "-".join(chars(d.rng, HEX, n) for n in (8, 4, 4, 4, 12)),
    "md5": lambda d, i: chars(d.rng, HEX, 32),
    "sha1": lambda d, i: chars(d.rng, HEX, 40),
    "sha256": lambda d, i: chars(d.rng, HEX, 64),
    "gitsha": lambda d, i: chars(d.rng, HEX, d.rng.choice([7, 7, 12, 40])),
    "tracking": tracking,
    "pnr": lambda d, i: chars(d.rng, "ABCDEFGHJKLMNPQRSTUVWXYZ23456789", 6),
    "flight": lambda d, i: d.rng.choice(["LH", "BA", "AF", "6E", "AI", "UA", "EW", "U2", "KL"])
    + " " + str(d.rng.randint(10, 2999)),
    "train": lambda d, i: str(d.rng.randint(500, 9999)),
    "conf": lambda d, i: d.rng.choice([f"#{digits(d.rng, 8)}", f"HX-{d.rng.randint(10000, 99999)}"]),
    "port": lambda d, i: str(d.rng.choice([8080, 8443, 5432, 6379, 3000, 9200, 443, 5000, 8000])),
    "ms": lambda d, i: str(d.rng.choice([5000, 10000, 30000, 60000])),
    "num": lambda d, i: str(d.rng.randint(100, 99999)),
    "line": lambda d, i: str(d.rng.randint(12, 880)),
    "pid": lambda d, i: str(d.rng.randint(300, 65000)),
    "hostname": lambda d, i: d.rng.choice(["web", "api", "db-primary", "worker", "k8s-node",
                                           "edge"]) + f"-{d.rng.randint(1, 40):02d}",
    "domain": lambda d, i: f"{slug(d.company(i))}.{d.rng.choice(COMPANY_TLDS[d.lang])}",
    "org": lambda d, i: slug(d.company(i)).split("-")[0],
    "repo": lambda d, i: d.rng.choice(["billing-service", "web", "infra", "data-pipeline",
                                       "mobile-app", "backend"]),
    "aws_region": lambda d, i: d.rng.choice(["eu-central-1", "eu-west-1", "us-east-1",
                                             "eu-west-3", "ap-south-1"]),
    "aws_secret": aws_secret,
    "ssh_pub": ssh_pub,
    "bic": lambda d, i: d.rng.choice(["COBADEFFXXX", "DEUTDEFF", "BNPAFRPPXXX", "BARCGB22",
                                      "NWBKGB2L", "INGDDEFFXXX", "SOGEFRPP", "UBSWCHZH80A"]),
    "vat": lambda d, i: {"en": "GB", "de": "DE", "fr": "FR"}[d.lang]
    + (digits(d.rng, 11) if d.lang == "fr" else digits(d.rng, 9)),
    "siret": lambda d, i: " ".join([digits(d.rng, 3), digits(d.rng, 3), digits(d.rng, 3),
                                    digits(d.rng, 5)]),
    "ein": lambda d, i: f"{d.rng.randint(10, 99)}-{digits(d.rng, 7)}",
    "emp_id": lambda d, i: f"E-{d.rng.randint(10000, 99999)}",
    "customer_no": lambda d, i: d.rng.choice([f"KD-{digits(d.rng, 7)}", f"{nonzero(d.rng)}{digits(d.rng, 8)}",
                                              f"C{digits(d.rng, 8)}"]),
    "mandate": lambda d, i: f"MNDT-{d.rng.randint(2023, 2025)}-{digits(d.rng, 6)}",
    "txn": lambda d, i: chars(d.rng, UPPER + DIGITS, 17),
    "ref": lambda d, i: f"VIR-{digits(d.rng, 6)}",
    "dossier": lambda d, i: digits(d.rng, 6),
    "kvnr": lambda d, i: d.rng.choice(UPPER) + digits(d.rng, 9),
    "last4": lambda d, i: digits(d.rng, 4),
    "exp": lambda d, i: f"{d.rng.randint(1, 12):02d}/{d.rng.randint(25, 31)}",
    "cvv": lambda d, i: digits(d.rng, 3),
    "pr": lambda d, i: str(d.rng.randint(100, 4999)),
    "agent": lambda d, i: d.rng.choice(FIRST[d.lang]),
    "country": lambda d, i: d.rng.choice(["Spain", "Italy", "the Netherlands", "Poland",
                                          "Portugal", "Ireland"]),
    "cert": lambda d, i: NEG_SECRETS["pem"](d.rng),
    # Explicit near misses (also what a labelled slot receives with P_NEAR_MISS).
    "card_neg": neg_card, "iban_neg": neg_iban, "ssn_neg": neg_ssn, "phone_neg": neg_phone,
    "ip_neg": neg_ip, "email_neg": neg_email, "secret_neg": neg_secret,
    "jwt_neg": neg_secret_of("jwt"),
    "mac": lambda d, i: ":".join(f"{d.rng.getrandbits(8):02{d.rng.choice('xX')}}" for _ in range(6)),
    "hms": lambda d, i: f"{d.rng.randint(0, 23):02d}:{d.rng.randint(0, 59):02d}:{d.rng.randint(0, 59):02d}",
    "dotted_version": lambda d, i: ".".join(str(d.rng.randint(0, 20))
                                            for _ in range(d.rng.randint(5, 6))),
    "oid": lambda d, i: f"1.3.6.1.4.1.{d.rng.randint(1000, 60000)}.{d.rng.randint(1, 9)}",
    "trunc_pem": lambda d, i: truncated_pem(d.rng),
}

# Look-alikes the brief asks for (order/invoice numbers, timestamps, Unix times, versions, UUIDs,
# hashes, tracking numbers, postcodes, amounts, undetected secrets) and PII.md's "is not" values.
HARD_FILLERS = {"postcode", "zip", "amount", "amount_inr", "order", "invoice", "ts", "rfc_date",
                "clf_date", "unix", "unix_ms", "version", "uuid", "md5", "sha1", "sha256",
                "gitsha", "tracking", "aws_secret", "ssh_pub", "vat", "siret", "ein", "cert",
                "card_neg", "iban_neg", "ssn_neg", "phone_neg", "ip_neg",
                "email_neg", "secret_neg", "jwt_neg", "dotted_version", "oid", "mac", "hms"}

# Hard negatives with a rule to fail, for --check: (checker, what it must fail).
NEG_CHECKS = {"card_neg": neg_card_ok, "iban_neg": neg_iban_ok, "ssn_neg": neg_ssn_ok,
              "ip_neg": neg_ip_ok, "dotted_version": neg_ip_ok,
              "oid": neg_ip_ok, "mac": neg_ip_ok, "hms": neg_ip_ok}

# Labelled slots: name -> (entity, generator, near-miss generator, near-miss check key).
SLOTS = {
    "EMAIL": ("email", gen_email, neg_email, None),
    "PHONE": ("phone", gen_phone, neg_phone, None),
    "MOBILE": ("phone", gen_mobile, neg_phone, None),
    "PHONE_INTL": ("phone", gen_phone_intl, neg_phone, None),
    "PHONE_IN": ("phone", gen_phone_in, neg_phone, None),
    "CARD": ("card", gen_card, neg_card, "card_neg"),
    "SSN": ("ssn", gen_ssn, neg_ssn, "ssn_neg"),
    "IBAN": ("iban", gen_iban, neg_iban, "iban_neg"),
    "IP": ("ip", gen_ip, neg_ip, "ip_neg"),
    "IP4": ("ip", gen_ipv4, neg_ipv4, "ip_neg"),
    "IP4_PRIV": ("ip", gen_ipv4_private, neg_ipv4, "ip_neg"),
    "IP4_PUB": ("ip", gen_ipv4_public, neg_ipv4, "ip_neg"),
    "IP6": ("ip", gen_ipv6, neg_ipv6, "ip_neg"),
    "SECRET": ("secret", gen_secret, neg_secret, None),
    "OPENAI": ("secret", gen_openai, neg_secret_of("openai"), None),
    "ANTHROPIC": ("secret", gen_anthropic, neg_secret_of("anthropic"), None),
    "AWS": ("secret", gen_aws, neg_secret_of("aws"), None),
    "GITHUB": ("secret", gen_github, neg_secret_of("github"), None),
    "STRIPE": ("secret", gen_stripe, neg_secret_of("stripe"), None),
    "SLACK": ("secret", gen_slack, neg_secret_of("slack"), None),
    "JWT": ("secret", gen_jwt, neg_secret_of("jwt"), None),
    "PEM": ("secret", gen_pem, neg_secret_of("pem"), None),
    "PEM_YAML": ("secret", gen_pem_yaml, neg_secret_of("pem"), None),
    "PEM_TRUNC": ("secret", lambda d, i: truncated_pem(d.rng), None, None),
}
VALUE_CHECKS = {"email": email_ok, "card": card_ok, "ssn": ssn_value_ok, "iban": iban_ok,
                "ip": ip_ok, "secret": secret_ok,
                "phone": lambda v: 8 <= len(re.sub(r"\D", "", v)) <= 16}
# Generators whose random output could, by chance, form some entity: retried until the
# reference matcher finds nothing in them (on their own).
RANDOM_LOOKALIKES = {"aws_secret", "ssh_pub", "cert", "uuid", "md5", "sha1", "sha256", "gitsha",
                     "tracking", "order", "siret", "txn", "customer_no", "card_neg", "iban_neg",
                     "ssn_neg", "phone_neg", "ip_neg", "secret_neg", "jwt_neg",
                     "email_neg", "version", "dotted_version", "oid", "mac"}


# ============================================================================================
# Templates. {SLOT} is a labelled entity, {filler} plain text (a digit suffix picks the
# second person/company or a fresh value: {name2}, {ts3}); {X*} repeats the value of {X};
# [[a||b]] picks one alternative, [[a]] is kept half the time.
# ============================================================================================

EN_TEMPLATES = [
"""[[Hi,||Hello,||Hey team,]] I was charged twice[[ for order {order}]] on {date}. The card I used was {CARD}[[ (exp {exp})]] and my account email is {EMAIL}. Can you help me write a polite complaint to the merchant?""",

"""Customer ticket {ticket}:
"I can't log in since yesterday. My username is {EMAIL}[[ and the phone number on file is {PHONE}]]. I've tried resetting my password twice and never got the mail."
Please draft a reply from the support team.""",

"""Summarise this email in two sentences:

From: {name} <{EMAIL}>
To: {name2} <{EMAIL2}>
Date: {rfc_date}
Subject: Re: contract renewal for {company2}

Hi {first2},

Thanks for the call. As discussed, the renewal starts on {date}[[; the new rate is {amount} per month]]. If anything changes, reach me on {PHONE}.

Best,
{first}""",

"""HR note - new hire onboarding
Name: {name}
Start date: {date}
SSN: {SSN}
Personal email: {EMAIL}
[[Mobile: {MOBILE}
]]Please turn this into a checklist for the payroll team.""",

"""Can you check this payroll change request? {name} asked to move salary payments to IBAN {IBAN} (bank in {city}) from next month. Employee ID {emp_id}. Does anything look off?""",

"""Please extract the fields from this invoice as JSON:

Invoice {invoice}
Issued: {date}
Bill to: {company}, {street}, {city}[[ {postcode}]]
Amount due: {amount}
Pay to IBAN: {IBAN}
BIC: {bic}
Questions: {EMAIL}""",

"""Why does this keep failing?

{ts} ERROR upstream connect error: host={IP4} port={port} attempt=3
{ts2} WARN retrying request_id={uuid}
{ts3} ERROR giving up after {ms}ms (client {IP})""",

"""Can you explain these access log lines? Looks like a scraper to me.

{IP4} - - [{clf_date}] "GET /api/v2/orders/{num} HTTP/1.1" 200 {num2} "-" "python-requests/{version}"
{IP4*} - - [{clf_date2}] "GET /api/v2/orders/{num3} HTTP/1.1" 429 0 "-" "python-requests/{version*}\"""",

"""This script fails with a 401, what am I doing wrong?

```python
from openai import OpenAI

client = OpenAI(api_key="{OPENAI}")
resp = client.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])
print(resp)
```""",

"""My boto3 client says InvalidClientTokenId. Here's my ~/.aws/credentials:

[default]
aws_access_key_id = {AWS}
aws_secret_access_key = {aws_secret}
region = {aws_region}

What should I check?""",

"""Review this .env for anything that shouldn't be committed:

NODE_ENV=production
PORT={port}
STRIPE_SECRET_KEY={STRIPE}
SLACK_BOT_TOKEN={SLACK}
[[SENTRY_RELEASE={version}
]]ADMIN_EMAIL={EMAIL}""",

"""The workflow can't push tags. Relevant part of the YAML:

```yaml
- name: push tags
  env:
    GH_TOKEN: {GITHUB}
  run: git push origin --tags
```
[[Commit {gitsha} is where it started failing.]]""",

"""Decode this JWT and tell me why the API rejects it (we get 401 since {date}):

{JWT}""",

"""curl -s -H "Authorization: Bearer {JWT}" https://api.{domain}/v1/users/{num} returns 403. The server is at {IP}. Ideas?""",

"""I pasted the key from our vault and ssh still says "invalid format". Is the key itself broken?

{PEM}

[[It was generated on {date} by {first}.]]""",

"""Please turn this booking confirmation into a calendar entry:

Booking reference: {pnr}
Passenger: {name}
Flight {flight} from {city} to {city2}, departs {date} at {time}
Contact: {PHONE}, {EMAIL}
Paid with card {CARD}""",

"""I booked a room at the {company} for {date} (confirmation {conf}). Now "the hotel" emails me from {EMAIL} asking me to confirm my card {CARD} and CVV {cvv} by replying. Is this phishing?""",

"""CRM note, call with {name} ({company}) on {date}:
- wants a quote for 50 seats
- direct line {PHONE}[[, mobile {MOBILE}]]
- send the deck to {EMAIL}
Rewrite this as a follow-up email.""",

"""Customer {name} from {city_in} says the UPI refund of {amount_inr} for order {order} never arrived. Registered mobile: {PHONE_IN}. Email: {EMAIL}. Draft a reply in simple English.""",

"""Is this iptables rule right? I want SSH only from the office.

-A INPUT -p tcp -s {IP4}/32 --dport 22 -j ACCEPT
-A INPUT -p tcp --dport 22 -j DROP

[[The office IPv6 prefix is {IP6}/48 if that matters.]]""",

"""Got this traceback in production at {ts}:

Traceback (most recent call last):
  File "/srv/app/billing.py", line {line}, in charge
    stripe.Charge.create(amount=amount, customer=cid)
stripe.error.AuthenticationError: Invalid API Key provided: {STRIPE}

[[We're on stripe-python {version}.]]""",

"""Why does my bot get "not_authed"? I'm calling chat.postMessage with token {SLACK} from {IP4}[[ (deployed {date})]].""",

"""export ANTHROPIC_API_KEY={ANTHROPIC}
python agent.py
-> anthropic.AuthenticationError: 401

The key was created on {date}. What's wrong?""",

"""I need to send {amount} to a supplier in {country}. They gave me IBAN {IBAN}[[ and their accounts email {EMAIL}]]. How long does a SEPA transfer take, and what reference should I use for invoice {invoice}?""",

"""Summarise this chat:

Agent ({agent}): Thanks for contacting {company}, how can I help?
Customer: hi my card ending {last4} was declined, full number is {CARD}
Agent: For your security please don't share full card numbers. Can you confirm the billing postcode?
Customer: {postcode}
Agent: Thanks. Ticket {ticket} is open, we'll call you on {PHONE}.""",

"""Fill in this W-4 summary for me: employee {name}, SSN {SSN}, address {street}, {city_us}[[ {zip}]]. Filing status single. Employer EIN {ein}.""",

"""Write release notes from these commits:

{gitsha} fix: retry on 503 (#{pr})
{gitsha2} feat: bump tokenizer to {version}
{gitsha3} chore: update lockfile, sha256 {sha256}
Tagged on {date}.""",

"""Where is my parcel? Tracking number {tracking}, shipped {date} to {street}, {city}[[ {postcode}]]. The courier called from {PHONE} but I missed it.""",

"""kubectl shows CrashLoopBackOff. Pod env:

```yaml
env:
  - name: DB_HOST
    value: "{IP4_PRIV}"
  - name: OPENAI_API_KEY
    value: "{OPENAI}"
[[  - name: BUILD_ID
    value: "{uuid}"
]]```""",

"""Notes from the outage review: the bad deploy was build {version} ({gitsha}), started at {ts} and was rolled back at Unix time {unix}. The pager went to {name} ({PHONE}).""",

"""Translate into French: "Please call me back on {PHONE} or write to {EMAIL} before {date}." """,

"""Add my key to the server at {IP} please:

ssh-ed25519 {ssh_pub} {first}@laptop""",

"""Our QA sheet says these test values must be rejected by the checkout form. Can you explain why each one is invalid?
- card {card_neg}
- IBAN {iban_neg}
- SSN {ssn_neg}
- phone {phone_neg}""",

"""Our monitoring flagged {ip_neg} as a source address in the firewall log and I think the exporter is broken. The MAC of the box is {mac}, it runs agent {dotted_version}. What could produce such a value?""",

"""Write a haiku about {city} in the rain.""",

"""Our style guide says C++11 or later. Why does this fail to compile?

```cpp
std::vector<int> v{3+4, 2};
std::map<std::string, int> m;
m["a"] = v.at(0);
```""",

"""What's the difference between Python {version} and {version2}? Keep it short.""",

"""Summarise the meeting: {name} (product) and {name2} ({company2}) agreed to move the launch to {date}.[[ Budget stays at {amount}.]] Next sync on {date2} at {time}.""",

"""Here's the private key that got cut off when I copied it from the terminal, can you tell which type it is?

{PEM_TRUNC}…

I only have this part.""",

"""Our webhook receiver logs: {ts} POST /hooks/stripe from {IP4} sig={sha256} status=401 (endpoint secret rotated on {date}). Key in use: {STRIPE}""",

"""Please reformat as a table: {name}, {PHONE}, {EMAIL}; {name2}, {PHONE2}, {EMAIL2}.""",

"""Can you rewrite this voicemail transcript so it reads clearly? "hi it's {name} from {company} um call me back on {PHONE} when you get a chance or just drop me a line at {EMAIL} thanks" """,

"""I'm filling in a background check form for {name}. It asks for the SSN ({SSN}), a current phone number ({PHONE}) and an email address ({EMAIL}). Which of these should only go over an encrypted channel?""",

"""Benefits enrollment for {name}: employee SSN {SSN}, spouse {name2} SSN {SSN2}[[, contact {EMAIL}]]. Is the form complete?""",

"""My credit card {CARD} shows a charge from {company2} that I don't recognise. Should I call the bank or the merchant first?""",

"""Write a two-line bio for our website: {name} leads the data team in {city}; press enquiries go to {EMAIL}.""",

"""Please proofread: "Dear {first}, your new login is {EMAIL}. If you have any questions, call our helpdesk on {PHONE}." """,

"""The new VPN config uses {IP4} as the gateway and {IP6} for IPv6. Which one goes into the AAAA record?""",

"""Make this Slack message a bit friendlier: "who pushed the AWS key {AWS} to the public repo?? rotate it NOW" """,

"""Summarise this note for the finance team: {name} called about a refund, wants it paid to {IBAN}, and prefers email ({EMAIL}) over phone.""",

"""Is it safe to keep my card number {CARD} in my phone's notes app, or should I use a password manager?""",
]

DE_TEMPLATES = [
"""Hallo, meine Bestellung[[ {order}]] vom {date} ist nicht angekommen. Ich habe mit der Karte {CARD} bezahlt. Meine E-Mail: {EMAIL}. Kannst du mir eine freundliche Beschwerde formulieren?""",

"""Fasse diese E-Mail kurz zusammen:

Von: {name} <{EMAIL}>
An: {name2} <{EMAIL2}>
Datum: {rfc_date}
Betreff: Rechnung {invoice}

Guten Tag {name2},

anbei die Rechnung über {amount}. Bitte überweisen Sie den Betrag bis zum {date} auf das Konto {IBAN}.
Bei Rückfragen erreichen Sie mich unter {PHONE}.

Mit freundlichen Grüßen
{name}""",

"""Personalakte (intern)
Name: {name}
Eintritt: {date}
Privatadresse: {street}, [[{postcode} ]]{city}
Telefon: {PHONE}
Gehaltskonto: {IBAN}
Bitte formuliere daraus eine Willkommensmail.""",

"""Unser neuer Kollege in Boston ({name}) braucht für die US-Lohnabrechnung seine Social Security Number im System: {SSN}. Wie trage ich die in Personio ein, ohne dass sie jeder sieht?""",

"""Kannst du prüfen, ob diese Rechnung korrekt ist?

Rechnungsnummer: {invoice}
Rechnungsdatum: {date}
Kunde: {company}, {street}, {postcode} {city}
Nettobetrag: {amount}
USt-IdNr.: {vat}
Zahlbar an: {IBAN}[[
Fragen an: {EMAIL}]]""",

"""Warum bricht die Verbindung ab?

{ts} ERROR connection reset by peer {IP4}:{port}
{ts2} INFO retry 1/3 (trace_id={md5})
{ts3} ERROR TLS handshake failed with {IP}""",

"""Mein Skript liefert immer 401 Unauthorized. Was mache ich falsch?

```python
import anthropic

client = anthropic.Anthropic(api_key="{ANTHROPIC}")
msg = client.messages.create(model="claude-sonnet-4-5", max_tokens=512, messages=[...])
```""",

"""Ich habe aus Versehen diese Datei ins Repo gepusht. Welche Werte muss ich jetzt rotieren?

DATABASE_HOST={IP4_PRIV}
AWS_ACCESS_KEY_ID={AWS}
AWS_SECRET_ACCESS_KEY={aws_secret}
GITHUB_TOKEN={GITHUB}[[
APP_VERSION={version}]]""",

"""Bitte erstelle aus dieser Buchungsbestätigung einen Kalendereintrag:

Buchungscode: {pnr}
Reisende/r: {name}
ICE {train} von {city} nach {city2}, Abfahrt {date} um {time} Uhr
Handy: {MOBILE}
E-Mail: {EMAIL}""",

"""Gesprächsnotiz {date}, {name} ({company}):
- Interesse an Lizenzen für 20 Nutzer
- Rückruf unter {PHONE}[[ oder mobil {MOBILE}]]
- Angebot an {EMAIL}
Mach daraus bitte eine Follow-up-Mail.""",

"""Formuliere eine Kündigung für meinen Handyvertrag. Kundennummer {customer_no}, Rufnummer {MOBILE}, Vertragsbeginn {date}. Das Guthaben bitte auf mein Konto {IBAN} erstatten.""",

"""SEPA-Lastschriftmandat: Ich ermächtige die {company}, Zahlungen von meinem Konto {IBAN} mittels Lastschrift einzuziehen. Mandatsreferenz {mandate}. Ist dieser Text rechtlich in Ordnung?""",

"""Ist diese SMS echt? "Ihr Paket {tracking} konnte nicht zugestellt werden. Bitte bestätigen Sie Ihre Kreditkarte {CARD} unter paket-service-{num}.info" """,

"""Unser Backend lehnt dieses Token seit dem letzten Update ab. Kannst du es dekodieren und sagen, was fehlt?

{JWT}""",

"""Der Deploy-Key funktioniert nicht, ist das Format kaputt?

{PEM}""",

"""Im Webhook-Handler bekomme ich "No signatures found". Konfiguration:

stripe.api_key = "{STRIPE}"
endpoint_secret = "whsec_..."
# Server: {IP4}""",

"""Unser Nginx leitet nicht weiter:

server {
    listen 443 ssl;
    listen [::]:443 ssl;
    server_name shop.{domain};
    location / {
        proxy_pass http://{IP4_PRIV}:{port};
    }
}""",

"""Mein Vermieter {name} will die Kaution ({amount}) nicht zurückzahlen. Er ist telefonisch unter {PHONE} erreichbar, meine Bankverbindung für die Rückzahlung ist {IBAN}. Schreib mir ein Mahnschreiben mit Frist zum {date}.""",

"""Ticket {ticket}: Kundin {name} meldet, dass der Login seit dem Update[[ auf {version}]] hängt. Rückmeldung bitte an {EMAIL}.[[ Session-ID: {uuid}.]]""",

"""Unser Slack-Bot postet nicht mehr. Token im Secret Manager: {SLACK}. Fehler: invalid_auth[[ (request {uuid})]].""",

"""Bitte ergänze die Firewall-Freigabe: Büro {city} {IP4}, Homeoffice {IP}, VPN-Gateway {IP4_PRIV}. Zeitfenster: {date}, {time} bis {time2} Uhr.""",

"""Erkläre mir den Unterschied zwischen pandas {version} und {version2}.""",

"""Schreib ein kurzes Gedicht über {city} im Herbst.""",

"""Bitte schreib eine Terminabsage an die Praxis Dr. {last} ({PHONE}): Mein Termin am {date} um {time} Uhr muss leider entfallen. Versichertennummer {kvnr}.""",

"""Rücksendung für Bestellung {order}, Sendungsnummer {tracking}, Erstattung {amount}. Kundenkonto: {EMAIL}. Laut Händler wurde am {date} überwiesen. Wo bleibt mein Geld?""",

"""Ich habe [[{amount}||Geld]] per PayPal an {EMAIL} geschickt, aber der Verkäufer behauptet, nichts erhalten zu haben. Transaktionscode {txn}. Was kann ich tun?""",

"""Bei git push kommt "Authentication failed", obwohl ich mich mit dem Token angemeldet habe:

echo {GITHUB} | gh auth login --with-token
git push origin main[[   # letzter Commit {gitsha}]]

Remote ist https://github.com/{org}/{repo}.git. Woran liegt das?""",

"""Meine Kreditkarte {CARD} wurde gesperrt, nachdem ich in {city_foreign} bezahlt habe. Die Hotline {PHONE} ist dauerbesetzt. Was soll ich tun?""",

"""Alert von Grafana: CPU über 95 % auf {hostname} ({IP}) seit {ts}. Letzter Deploy: {gitsha} (Build {version}). Bereitschaft hat laut Plan {name}, mobil {MOBILE}.""",

"""Welche dieser Testdaten sollte unser Formular ablehnen, und warum?
Karte: {card_neg}
IBAN: {iban_neg}
Telefon: {phone_neg}""",

"""Im Log steht als Client-Adresse {ip_neg}, und die Uhrzeit {hms} sieht auch komisch aus (MAC {mac}). Ist der Log-Parser kaputt? Agent-Version {dotted_version}.""",

"""Hier ist unser SMTP-Setup für den Newsletter, warum landet alles im Spam?

smtp_host = {IP4}
smtp_user = {EMAIL}
smtp_password = "{aws_secret}"
from = "{company} <{EMAIL*}>\"""",

"""Kannst du diese Kontaktliste als CSV formatieren? {name}, {PHONE}, {EMAIL}; {name2}, {PHONE2}, {EMAIL2}""",

"""Ich habe den Schlüssel aus dem Terminal kopiert, aber er ist abgeschnitten. Welcher Typ ist das?

{PEM_TRUNC}…""",

"""Bitte formuliere diese Nachricht freundlicher: "Ruf mich sofort unter {MOBILE} an, es geht um den Vertrag mit {company}!" """,

"""Hilf mir bei einer Abwesenheitsnotiz. In dringenden Fällen sollen sich Kunden an {name2} wenden ({EMAIL2}, Tel. {PHONE2}).""",

"""Meine Kreditkarte {CARD} wurde doppelt belastet. Schreib bitte eine kurze Mail an {EMAIL}.""",

"""Übersetze ins Englische: "Bitte überweisen Sie die Kaution auf das Konto {IBAN}. Bei Fragen erreichen Sie mich unter {PHONE}." """,

"""Unser Server {IP4_PUB} ist von außen nicht erreichbar, intern aber schon unter {IP4_PRIV}. Was prüfe ich zuerst?""",

"""Ich habe meinen OpenAI-Key {OPENAI} versehentlich in einem öffentlichen Gist gepostet. Was muss ich jetzt tun?""",

"""Fasse zusammen: {name} hat angerufen, möchte die Erstattung auf {IBAN} und bittet um Rückruf unter {MOBILE}.""",
]

FR_TEMPLATES = [
"""Bonjour, ma commande[[ n° {order}]] du {date} n'est jamais arrivée. J'ai payé avec la carte {CARD}. Mon adresse e-mail\u00a0: {EMAIL}. Peux-tu m'aider à rédiger une réclamation\u00a0?""",

"""Résume ce mail en trois points\u00a0:

De : {name} <{EMAIL}>
À : {name2} <{EMAIL2}>
Date : {rfc_date}
Objet : Facture {invoice}

Bonjour {first2},

Veuillez trouver ci-joint la facture d'un montant de {amount}, à régler avant le {date} par virement sur l'IBAN {IBAN}.
Pour toute question, je reste joignable au {PHONE}.

Cordialement,
{first}""",

"""Fiche salarié (confidentiel)
Nom : {name}
Date d'entrée : {date}
Adresse : {street}, [[{postcode} ]]{city}
Téléphone : {PHONE}
IBAN : {IBAN}
Peux-tu préparer le mail d'accueil\u00a0?""",

"""Notre nouvelle recrue à New York, {name}, doit être déclarée côté américain. Son numéro de sécurité sociale américain (SSN) est {SSN}. Comment le stocker de façon conforme au RGPD ?""",

"""Vérifie cette facture stp :

Facture n° {invoice}
Date : {date}
Client : {company}, {street}, {postcode} {city}
Montant TTC : {amount}
SIRET : {siret}
IBAN : {IBAN}""",

"""Pourquoi ce service redémarre en boucle ?

{ts} ERROR could not connect to redis at {IP4_PRIV}:6379
{ts2} WARN healthcheck failed from {IP} (pid {pid})
{ts3} ERROR exiting with code 137""",

"""Mon code renvoie une erreur 401, tu vois pourquoi ?

```js
import OpenAI from "openai";
const openai = new OpenAI({ apiKey: "{OPENAI}" });
```""",

"""Voici mon docker-compose, le conteneur n'arrive pas à joindre l'API :

services:
  worker:
    image: registry.{domain}/worker:{version}
    environment:
      - STRIPE_KEY={STRIPE}
      - API_HOST={IP4_PRIV}
      - NOTIFY_EMAIL={EMAIL}""",

"""Peux-tu ajouter ce voyage à mon agenda ?

Référence de réservation : {pnr}
Passager : {name}
TGV INOUI {train} {city} → {city2}, départ le {date} à {time}
Portable : {MOBILE}
E-mail : {EMAIL}""",

"""Compte rendu d'appel du {date} avec {name} ({company}) :
- besoin : 30 licences
- ligne directe : {PHONE}[[
- portable : {MOBILE}]]
- envoyer la proposition à {EMAIL}
Rédige un mail de relance.""",

"""Rédige une lettre de résiliation pour mon abonnement internet. Numéro client {customer_no}, ligne {PHONE}, remboursement sur l'IBAN {IBAN}.""",

"""Ce SMS est-il une arnaque\u00a0? «\u00a0Votre colis {tracking} est en attente. Réglez {amount} de frais de port avec votre carte {CARD} sur colis-suivi-{num}.fr\u00a0»""",

"""L'API me renvoie « token expired » alors que je viens de le générer. Le voici :

{JWT}[[

Heure du serveur : {ts}.]]""",

"""J'ai collé la clé privée dans la variable SSH_KEY de GitLab CI mais le job échoue (« error in libcrypto »). La clé :

{PEM}""",

"""Mon script boto3 plante avec SignatureDoesNotMatch :

session = boto3.Session(
    aws_access_key_id="{AWS}",
    aws_secret_access_key="{aws_secret}",
    region_name="eu-west-3",
)

Une idée ?""",

"""Le bot Slack ne répond plus depuis la dernière mise à jour. Token utilisé : {SLACK}. Erreur : token_revoked.""",

"""Ajoute ces adresses à la liste blanche : bureau de {city} {IP4}, agence {IP}, et le VPN {IP6}.""",

"""Mon propriétaire, M. {last}, ne m'a pas rendu le dépôt de garantie de {amount}. Son numéro : {PHONE}. Mon IBAN pour le remboursement : {IBAN}. Rédige une mise en demeure avec un délai au {date}.""",

"""Ticket {ticket} : la cliente {name} ne reçoit pas les mails de réinitialisation sur {EMAIL}. [[Version de l'app : {version}.]]""",

"""J'ai fait un virement de {amount} vers l'IBAN {IBAN} le {date} (référence {ref}), mais le bénéficiaire dit n'avoir rien reçu. Que faire ?""",

"""Écris un mail au cabinet du Dr {last} ({PHONE}) pour déplacer mon rendez-vous du {date} à {time}. Mon numéro de dossier est {dossier}.""",

"""Le push échoue : "remote: Invalid username or token". Pourtant j'ai exporté GH_TOKEN={GITHUB} avant de lancer git push sur https://github.com/{org}/{repo}.git""",

"""Explique-moi la différence entre Django {version} et {version2}.""",

"""Donne-moi une recette de crêpes pour quatre personnes, sans lactose.""",

"""Alerte Datadog : latence p99 > 2 s sur {hostname} ({IP}) depuis {ts}. Dernier déploiement {gitsha}. L'astreinte est assurée par {name}, {MOBILE}.""",

"""Ma carte {CARD} a été bloquée après un paiement à {city_foreign}. Le service client ({PHONE}) ne répond pas. Que dois-je faire ?""",

"""Un acheteur sur Leboncoin me demande mon numéro {MOBILE} et mon IBAN pour «\u00a0sécuriser\u00a0» le paiement[[ de {amount}]]. Il m'écrit depuis {EMAIL}. Est-ce une arnaque ?""",

"""Je teste l'API Claude et j'ai une erreur d'authentification :

curl https://api.anthropic.com/v1/messages -H "x-api-key: {ANTHROPIC}" -H "anthropic-version: 2023-06-01\"""",

"""Stacktrace reçue le {date} :

java.net.ConnectException: Connection refused ([{IP6}]:8443)
\tat com.{org}.client.Http.send(Http.java:{line})
\tat com.{org}.sync.Job.run(Job.java:{line2})
Version {version}, build {gitsha}.""",

"""Pour la recette, quelles valeurs de test doivent être refusées par le formulaire, et pourquoi ?
- carte : {card_neg}
- IBAN : {iban_neg}
- téléphone : {phone_neg}""",

"""Le SNMP renvoie l'OID {oid} et l'adresse {ip_neg}, c'est normal ? L'horodatage {hms} ne correspond à rien, et l'adresse MAC {mac} non plus.""",

"""Mets ces contacts dans un tableau : {name}, {PHONE}, {EMAIL} ; {name2}, {PHONE2}, {EMAIL2}.""",

"""Voici le début de la clé, le reste a été coupé par le terminal. C'est quel type de clé ?

{PEM_TRUNC}…""",

"""Notre Helm chart ne démarre pas :

```yaml
tls:
  key: |
    {PEM_YAML}
  host: {IP4_PRIV}
```""",

"""Reformule ce message plus poliment : « Rappelle-moi vite au {MOBILE}, c'est urgent pour le dossier {company} ! »""",

"""Rédige un message d'absence : en cas d'urgence, contacter {name2} ({EMAIL2}, tél. {PHONE2}).""",

"""Ma carte {CARD} a été débitée deux fois. Écris un court mail à {EMAIL} pour demander le remboursement.""",

"""Traduis en anglais : « Merci de virer la caution sur le compte {IBAN}. Pour toute question : {PHONE}. »""",

"""Le serveur {IP4_PUB} ne répond plus depuis l'extérieur, mais en interne {IP4_PRIV} fonctionne. Par quoi commencer ?""",

"""J'ai publié par erreur ma clé OpenAI {OPENAI} dans un dépôt public. Que dois-je faire ?""",

"""Résume : {name} a appelé, souhaite le remboursement sur {IBAN} et demande à être rappelé au {MOBILE}.""",
]

TEMPLATES = {"en": EN_TEMPLATES, "de": DE_TEMPLATES, "fr": FR_TEMPLATES}

SLOT_RE = re.compile(r"\{([A-Za-z][A-Za-z0-9_]*)(\*?)\}")
OPTION_RE = re.compile(r"\[\[(.*?)\]\]", re.S)


def slot_name(name: str) -> tuple[str, int]:
    """PHONE2 -> (PHONE, 2); IP4 stays IP4 (a slot of that name exists)."""
    if name in SLOTS or name in FILLERS:
        return name, 1
    m = re.fullmatch(r"(.*?)(\d+)", name)
    if not m or not (m.group(1) in SLOTS or m.group(1) in FILLERS):
        raise KeyError(f"unknown slot {{{name}}}")
    return m.group(1), int(m.group(2))


def _check_templates():
    for lang, templates in TEMPLATES.items():
        for t in templates:
            labelled = [m.group(1) for m in SLOT_RE.finditer(t)
                        if slot_name(m.group(1))[0] in SLOTS]
            assert len(labelled) <= MAX_SPANS, (lang, t[:60])


# ============================================================================================
# Rendering
# ============================================================================================

class Doc:
    """One document being generated: its language, people, and what has been planted."""

    def __init__(self, rng: random.Random, lang: str, ref: "Reference"):
        self.rng, self.lang, self.ref = rng, lang, ref
        firsts = rng.sample(FIRST[lang], 3)
        lasts = rng.sample(LAST[lang], 3)
        self.people = list(zip(firsts, lasts))
        self.companies = rng.sample(COMPANIES[lang], 2)
        self.cities = rng.sample(CITIES[lang], 3)
        self.memo: dict[str, tuple[str, str | None]] = {}
        self.t0 = dt.datetime(2023, 1, 1) + dt.timedelta(seconds=rng.randint(0, 86400 * 1000),
                                                         microseconds=rng.randint(0, 999) * 1000)
        self.ts_format = rng.randrange(5)
        self.hard: list[tuple[str, str]] = []

    def person(self, idx):
        return self.people[(idx - 1) % len(self.people)]

    def company(self, idx):
        return self.companies[(idx - 1) % len(self.companies)]

    def city(self, idx):
        return self.cities[(idx - 1) % len(self.cities)]

    def clock(self, idx):
        return self.t0 + dt.timedelta(seconds=7 * (idx - 1) + self.rng.randint(0, 5))

    def lookalike(self, kind: str, gen, idx: int) -> str:
        """A random value that must not, by chance, form an entity: retried until the reference
        matcher finds nothing in it."""
        for _ in range(50):
            v = gen(self, idx)
            if not self.ref.find(f" {v} ".encode()):
                return v
        raise RuntimeError(f"could not draw a clean {kind}")

    def resolve(self, name: str, repeat: bool) -> tuple[str, str | None]:
        if repeat:
            return self.memo[name]
        base, idx = slot_name(name)
        if base in SLOTS:
            entity, gen, near_miss, check_key = SLOTS[base]
            if near_miss and self.rng.random() < P_NEAR_MISS:
                value = self.lookalike(base, near_miss, idx)
                self.hard.append((check_key or base, value))
                out = (value, None)
            else:
                out = (gen(self, idx), entity)
        else:
            gen = FILLERS[base]
            value = self.lookalike(base, gen, idx) if base in RANDOM_LOOKALIKES else gen(self, idx)
            if base in HARD_FILLERS:
                self.hard.append((base, value))
            out = (value, None)
        self.memo[name] = out
        return out


def choose_options(rng: random.Random, template: str) -> str:
    def pick(m):
        alternatives = m.group(1).split("||")
        if len(alternatives) == 1:
            return alternatives[0] if rng.random() < 0.5 else ""
        return rng.choice(alternatives)
    return OPTION_RE.sub(pick, template)


def render(doc: Doc, template: str):
    """Fills a template; returns the text and the planted spans (byte offsets, value)."""
    template = choose_options(doc.rng, template)
    parts: list[str] = []
    spans = []
    size = 0
    pos = 0
    for m in SLOT_RE.finditer(template):
        literal = template[pos:m.start()]
        parts.append(literal)
        size += len(literal.encode())
        value, entity = doc.resolve(m.group(1), bool(m.group(2)))
        if entity:
            spans.append((size, size + len(value.encode()), entity, value))
        parts.append(value)
        size += len(value.encode())
        pos = m.end()
    parts.append(template[pos:])
    return "".join(parts), spans


def generate(seed: int, count: int, ref: "Reference"):
    rng = random.Random(seed)
    for _ in range(count):
        lang = rng.choice(LANGS)
        doc = Doc(rng, lang, ref)
        text, spans = render(doc, rng.choice(TEMPLATES[lang]))
        yield lang, text, spans, doc.hard


# ============================================================================================
# Reference: the scanner's rules re-implemented in Python, to check the corpus (patterns.rs,
# validate.rs, scanner.rs). It reports every finding the rules make in a text.
# ============================================================================================

def _word(b):
    return b is not None and (48 <= b <= 57 or 65 <= b <= 90 or 97 <= b <= 122 or b == 95)


def _digit(b):
    return b is not None and 48 <= b <= 57


def _before(t, s, k):
    return t[s - k] if s - k >= 0 else None


def _after(t, e, k):
    return t[e + k] if e + k < len(t) else None


def _run(t, start, cls):
    i = min(start, len(t))
    j = i
    while j < len(t) and cls(t[j]):
        j += 1
    return j - i


def _continues_a_number(t, s, e):
    sep = lambda b: b in (0x2E, 0x2D)
    return ((sep(_before(t, s, 1)) and _digit(_before(t, s, 2)))
            or (sep(_after(t, e, 0)) and _digit(_after(t, e, 1))))


def _consistent_separators(span: bytes):
    seps = [b for b in span if not _digit(b) and b not in b"()+"]
    return all(b == seps[0] for b in seps)


def _digits(span: bytes) -> str:
    return "".join(chr(b) for b in span if _digit(b))


def v_card(t, s, e):
    span = t[s:e]
    d = _digits(span)
    return (_consistent_separators(span) and not _continues_a_number(t, s, e)
            and 12 <= len(d) <= 19 and card_brand(d) is not None and luhn_ok(d))


def v_ssn(t, s, e):
    d = _digits(t[s:e])
    return len(d) == 9 and not _continues_a_number(t, s, e) and ssn_ok(d)


def v_iban(t, s, e):
    span = t[s:e].decode("latin-1")
    if " " in span:
        groups = span.split(" ")
        if any(len(g) != 4 for g in groups[:-1]) or not 1 <= len(groups[-1]) <= 4:
            return False
    compact = span.replace(" ", "")
    want = IBAN_LENGTHS.get(compact[:2])
    ok_len = len(compact) == want if want else 15 <= len(compact) <= 34
    return ok_len and len(compact) >= 5 and re.fullmatch(r"[0-9A-Z]+", compact) is not None \
        and iban_mod97(compact) == 1


def v_ipv4(t, s, e):
    if _continues_a_number(t, s, e):
        return False
    parts = t[s:e].split(b".")
    return len(parts) == 4 and all(
        1 <= len(p) <= 3 and p.isdigit() and int(p) <= 255 and (p == b"0" or p[:1] != b"0")
        for p in parts)


def v_ipv6(t, s, e):
    span = t[s:e]
    near = lambda b: _word(b) or b == 0x3A
    if near(_before(t, s, 1)) or near(_after(t, e, 0)):
        return False
    if not any(chr(b) in "0123456789abcdefABCDEF" for b in span) or span.count(b":") < 2:
        return False
    try:
        ipaddress.IPv6Address(span.decode("ascii"))
        return True
    except ValueError:
        return False


def v_email(t, s, e):
    span = t[s:e]
    at = span.find(b"@")
    if at < 0:
        return False
    local, domain = span[:at], span[at + 1:]
    if local[:1] == b"." or local[-1:] == b"." or b".." in local:
        return False
    labels = domain.split(b".")
    if len(labels) < 2:
        return False
    tld = labels[-1]
    return (len(tld) >= 2 and tld.isalpha() and tld.isascii()
            and all(0 < len(x) <= 63 and x[:1] != b"-" and x[-1:] != b"-" for x in labels))


def _phone_common(t, s, e, lo, hi):
    span = t[s:e]
    d = _digits(span)
    opens, closes = span.count(b"("), span.count(b")")
    if opens != closes or opens > 1 or _continues_a_number(t, s, e) or not lo <= len(d) <= hi:
        return None
    return d


def v_phone_intl(t, s, e):
    prev = _before(t, s, 1)
    if _word(prev) or prev == 0x2B:
        return False
    trunk = sum(1 for i in range(s, e - 2) if t[i:i + 3] == b"(0)")
    return _phone_common(t, s, e, 8 + trunk, 15 + trunk) is not None


def v_phone_us(t, s, e):
    span = t[s:e]
    d = _phone_common(t, s, e, 10, 11)
    if d is None:
        return False
    if len(d) == 11:
        if d[0] != "1":
            return False
        d = d[1:]
    i = span.rfind(b")")
    tail = span[i + 1:] if i >= 0 else span
    return d[0] >= "2" and d[3] >= "2" and _consistent_separators(tail.lstrip(b" \t\n\r\x0c"))


def _inside_groups(t, s):
    b2 = _before(t, s, 2)
    return _before(t, s, 1) in (0x20, 0x2E, 0x2D, 0x2F) and (
        _digit(b2) or (b2 is not None and 65 <= b2 <= 90))


def v_phone_uk(t, s, e):
    if _inside_groups(t, s):
        return False
    d = _phone_common(t, s, e, 10, 11)
    if d is None:
        return False
    return any(not _digit(b) for b in t[s:e]) or (len(d) == 11 and d[1] == "7")


def v_phone_de(t, s, e):
    return not _inside_groups(t, s) and _phone_common(t, s, e, 10, 12) is not None


def v_phone_fr(t, s, e):
    if _inside_groups(t, s):
        return False
    span = t[s:e]
    d = _phone_common(t, s, e, 10, 10)
    if d is None:
        return False
    if any(not _digit(b) for b in span):
        return _consistent_separators(span) and sum(not _digit(b) for b in span) == 4
    return d[1] in "67"


def _has_classes(b: bytes):
    return has_classes(b.decode("latin-1"))


def v_openai(t, s, e):
    span = t[s:e]
    return not span.startswith(b"sk-ant-") and _has_classes(span[3:])


def v_random_token(t, s, e):
    span = t[s:e]
    i = max(span.rfind(b"_"), span.rfind(b"-"))
    body = span[i + 1:] if i >= 0 else span
    return any(_digit(b) for b in body) or _has_classes(span)


def v_slack(t, s, e):
    return sum(_digit(b) for b in t[s:e]) >= 4


def _b64url_class(b):
    return b is not None and (_word(b) and b != 95 or b in (0x2D, 0x5F))


def _b64url_decode(s: bytes):
    out, acc, bits = bytearray(), 0, 0
    for c in s:
        if 65 <= c <= 90:
            v = c - 65
        elif 97 <= c <= 122:
            v = c - 97 + 26
        elif 48 <= c <= 57:
            v = c - 48 + 52
        elif c == 0x2D:
            v = 62
        elif c == 0x5F:
            v = 63
        else:
            return None
        acc, bits = (acc << 6) | v, bits + 6
        if bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
            acc &= (1 << bits) - 1
    return bytes(out)


def v_jwt(t, s, e):
    if _b64url_class(_after(t, e, 0)):
        return False
    span = t[s:e]
    dot = span.find(b".")
    header = _b64url_decode(span[:dot]) if dot >= 0 else None
    if header is None:
        return False
    try:
        obj = json.loads(header.decode("utf-8"))
    except ValueError:
        return False
    return isinstance(obj, dict) and "alg" in obj


def v_always(t, s, e):
    return True


def v_never(t, s, e):  # gateway keys need the CRC of aigw_wire; none are generated
    return False


def x_token(cap):
    def extend(t, s, head_end):
        end = head_end + _run(t, head_end, _b64url_class)
        if end - s > cap:
            return None
        run_end = end
        while end > head_end and t[end - 1] == 0x2D:
            end -= 1
        return (s, end) if run_end - end < 4 else None
    return extend


def x_email(t, s, e):
    local_cls = lambda b: _word(b) and b != 95 or b in b"._%+-"
    at = s + 1
    back = 0
    while back < 65 and at - back - 1 >= 0 and local_cls(t[at - back - 1]):
        back += 1
    if back > 64:
        return None
    start = at - back
    while start < at and not (_word(t[start]) and t[start] != 95):
        start += 1
    if start == at or (start > 0 and _word(t[start - 1])):
        return None
    dom_cls = lambda b: _word(b) and b != 95 or b in b".-"
    end = e - 1 + _run(t, e - 1, dom_cls)
    run_end = end
    while end > at + 1 and t[end - 1] in b".-":
        end -= 1
    if run_end - end >= 4 or end - at - 1 > 253 or _after(t, end, 0) == 0x5F:
        return None
    return start, end


def x_ipv6(t, s, e):
    hexcolon = lambda b: chr(b) in "0123456789abcdefABCDEF:"
    back = 0
    while back < 46 and s - back - 1 >= 0 and hexcolon(t[s - back - 1]):
        back += 1
    start = s - back
    end = e + _run(t, e, lambda b: hexcolon(b) or b == 0x2E)
    run_end = end
    while t[end - 1] == 0x2E:
        end -= 1
    return (start, end) if run_end - end < 4 and end - start <= 45 else None


def x_jwt(t, s, head_end):
    header = head_end - s + _run(t, head_end, _b64url_class)
    if header > 1024 or _after(t, s + header, 0) != 0x2E:
        return None
    dot = s + header + 1
    payload = _run(t, dot, _b64url_class)
    if not 2 <= payload <= 4096 or _after(t, dot + payload, 0) != 0x2E:
        return None
    sig_from = dot + payload + 1
    sig = _run(t, sig_from, _b64url_class)
    return (s, sig_from + sig) if sig <= 1024 else None


def _pem_footer(t: bytes, at: int):
    if not t.startswith(b"-----END ", at):
        return None
    i = at + 9
    for _ in range(3):
        if t.startswith(b"PRIVATE KEY", i):
            i += 11
            if t.startswith(b" BLOCK", i):
                i += 6
            return i + 5 - at if t.startswith(b"-----", i) else None
        w = _run(t, i, lambda b: 65 <= b <= 90 or _digit(b))
        if not 1 <= w <= 10 or _after(t, i + w, 0) != 0x20:
            return None
        i += w + 1
    return None


def x_pem(t, s, header_end):
    body_cls = lambda b: (_word(b) and b != 95) or b in b" +/=:,.()\t\r\n\x0b\x0c"
    body = min(_run(t, header_end, body_cls), 8192)
    if body < 16:
        return None
    end = header_end + body
    f = _pem_footer(t, end)
    return s, (end + f if f is not None else end)


PEM_HEADER = (rb"-----BEGIN (?:[A-Z0-9]{1,10} ){0,2}PRIVATE KEY(?: BLOCK)?-----(?:\s{1,2}"
              rb"Proc-Type: 4,ENCRYPTED\s{1,2}DEK-Info: [A-Z0-9\-]{1,24},[0-9A-Fa-f]{16,64})?")

# (name, entity, priority, expression, validator, extension, widest head) -- patterns.rs order.
RULES = [
    ("email", "email", 50, rb"[A-Za-z0-9._%+\-]@[A-Za-z0-9]", v_email, x_email, 3),
    ("phone_intl", "phone", 40,
     rb"\+[1-9][0-9]{0,3}(?:[ .\-]?(?:\([0-9]{1,5}\)[ .\-]?)?[0-9]{1,5}){1,6}\b",
     v_phone_intl, None, 89),
    ("phone_us", "phone", 40,
     rb"\b(?:1[ .\-])?[2-9][0-9]{2}[ .\-][2-9][0-9]{2}[ .\-][0-9]{4}\b", v_phone_us, None, 14),
    ("phone_us_paren", "phone", 40,
     rb"(?:\b1[ .\-]?)?\([2-9][0-9]{2}\)[ .\-]?[2-9][0-9]{2}[ .\-][0-9]{4}\b", v_phone_us,
     None, 16),
    ("phone_uk", "phone", 40, rb"\b0[1-9][0-9]{2,4}[ \-]?[0-9]{3,4}[ \-]?[0-9]{3,4}\b",
     v_phone_uk, None, 16),
    ("phone_de", "phone", 40, rb"\b0[1-9][0-9]{1,4}[ /\-][0-9]{3,9}(?:[ \-][0-9]{1,5})?\b",
     v_phone_de, None, 22),
    ("phone_de_mobile", "phone", 40, rb"\b01[5-7][0-9]{8,9}\b", v_phone_de, None, 12),
    ("phone_fr", "phone", 40, rb"\b0[1-9](?:[ .\-]?[0-9]{2}){4}\b", v_phone_fr, None, 14),
    ("phone_in", "phone", 40, rb"\b(?:0|91[ \-]?)?[6-9][0-9]{4}[ \-][0-9]{5}\b", v_phone_de,
     None, 14),
    ("phone_in_trunk", "phone", 40, rb"\b0[6-9][0-9]{9}\b", v_phone_de, None, 11),
    ("card", "card", 80, rb"\b[2-68][0-9]{11,18}\b", v_card, None, 19),
    ("card_grouped", "card", 80, rb"\b[2-68][0-9]{3}(?:[ \-][0-9]{4}){2,3}(?:[ \-][0-9]{1,4})?\b",
     v_card, None, 24),
    ("card_amex", "card", 80, rb"\b3[0-9]{3}[ \-][0-9]{6}[ \-][0-9]{4,5}\b", v_card, None, 17),
    ("ssn", "ssn", 60, rb"\b[0-9]{3}-[0-9]{2}-[0-9]{4}\b", v_ssn, None, 11),
    ("ssn_spaced", "ssn", 60, rb"\b[0-9]{3} [0-9]{2} [0-9]{4}\b", v_ssn, None, 11),
    ("iban", "iban", 70, rb"\b[A-Z]{2}[0-9]{2}(?: ?[A-Z0-9]){11,30}\b", v_iban, None, 64),
    ("ipv4", "ip", 30, rb"\b(?:[0-9]{1,3}\.){3}[0-9]{1,3}\b", v_ipv4, None, 15),
    ("ipv6", "ip", 30, rb":[0-9A-Fa-f]{0,4}:", v_ipv6, x_ipv6, 6),
    ("openai_key", "secret", 100, rb"\bsk-(?:proj-|svcacct-|admin-)?[A-Za-z0-9_\-]{20}",
     v_openai, x_token(256), 31),
    ("anthropic_key", "secret", 110, rb"\bsk-ant-(?:api|admin|sid)[0-9]{2}-[A-Za-z0-9_\-]{32}",
     v_always, x_token(256), 47),
    ("aws_access_key_id", "secret", 110, rb"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", v_always, None, 20),
    ("github_token", "secret", 110, rb"\bgh[pousr]_[A-Za-z0-9]{36}\b", v_always, None, 40),
    ("github_pat", "secret", 110, rb"\bgithub_pat_[A-Za-z0-9_]{82}\b", v_always, None, 93),
    ("stripe_key", "secret", 110, rb"\b(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{20,247}\b",
     v_random_token, None, 255),
    ("slack_token", "secret", 110, rb"\bxox[baprs]-[A-Za-z0-9\-]{10}", v_slack, x_token(256), 15),
    ("gateway_key", "secret", 120, rb"\baigw_(?:prod|stg|dev)_[A-Za-z0-9]{12}_[A-Za-z0-9]{36}\b",
     v_never, None, 59),
    ("jwt", "secret", 105, rb"\beyJ[A-Za-z0-9_\-]{5}", v_jwt, x_jwt, 8),
    ("pem_private_key", "secret", 110, PEM_HEADER, v_always, x_pem, 200),
]
# phone_in and phone_in_trunk use validate::phone_in, which is phone_de's check (10-12 digits).


class Reference:
    """Findings of the built-in rules in a text, overlaps resolved (scanner.rs `find`)."""

    def __init__(self):
        self.rules = []
        for rid, (name, entity, prio, expr, validate, extend, width) in enumerate(RULES):
            trailing_b = expr.endswith(rb"\b")
            self.rules.append((rid, entity, prio, re.compile(b"(?=" + expr + b")"),
                               re.compile(expr[:-2] if trailing_b else expr), trailing_b,
                               validate, extend, width))

    @staticmethod
    def _boundary(t, e):
        return _word(t[e - 1] if e > 0 else None) != _word(t[e] if e < len(t) else None)

    def candidates(self, t: bytes):
        out = set()
        for rid, entity, prio, starts, body, trailing_b, validate, extend, width in self.rules:
            # Hyperscan (SOM_LEFTMOST) reports each match end once, with its leftmost start.
            leftmost: dict[int, int] = {}
            for m in starts.finditer(t):
                s = m.start()
                for e in range(s + 1, min(len(t), s + width) + 1):
                    if e not in leftmost and body.fullmatch(t, s, e) and (
                            not trailing_b or self._boundary(t, e)):
                        leftmost[e] = s
            by_start: dict[int, list[int]] = {}
            for e, s in leftmost.items():
                by_start.setdefault(s, []).append(e)
            for s, ends in by_start.items():
                for e in sorted(ends, reverse=True):  # the longest end that validates
                    span = extend(t, s, e) if extend else (s, e)
                    if span and validate(t, *span):
                        out.add((span[0], span[1], rid, entity, prio))
                        break
        return sorted(out)

    def find(self, t: bytes):
        cands = self.candidates(t)
        key = lambda c: (c[1] - c[0], c[4], -c[0], -c[2])
        kept = [c for c in cands
                if not any(o is not c and o[0] < c[1] and c[0] < o[1] and key(o) > key(c)
                           for o in cands)]
        return [(s, e, entity) for s, e, _, entity, _ in kept]


# ============================================================================================
# Self-check and main
# ============================================================================================

def check_document(text: str, spans, hard, ref: Reference, problems: list[str]):
    raw = text.encode()
    last_end = 0
    if len(spans) > MAX_SPANS:
        problems.append(f"{len(spans)} spans: {text[:80]!r}")
    for s, e, entity, value in spans:
        if s < last_end:
            problems.append(f"overlap/unsorted at {s}: {text[:80]!r}")
        last_end = e
        if raw[s:e].decode(errors="replace") != value:
            problems.append(f"span {s}..{e} decodes to {raw[s:e]!r}, planted {value!r}")
        if not VALUE_CHECKS[entity](value):
            problems.append(f"{entity} {value!r} breaks its PII.md rule")
    for kind, value in hard:
        check = NEG_CHECKS.get(kind)
        if check and not check(value):
            problems.append(f"hard negative {kind} {value!r} is an entity")
    want = sorted((s, e, entity) for s, e, entity, _ in spans)
    got = sorted(ref.find(raw))
    if want != got:
        extra = [(raw[s:e].decode(errors="replace"), x) for s, e, x in got if (s, e, x) not in want]
        missed = [(raw[s:e].decode(errors="replace"), x) for s, e, x in want if (s, e, x) not in got]
        problems.append(f"reference disagrees: unlabelled findings {extra}, missed {missed} "
                        f"in {text[:100]!r}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seed", type=int, required=True)
    ap.add_argument("--count", type=int, required=True)
    ap.add_argument("--out", required=True, help="output JSON Lines file")
    ap.add_argument("--check", action="store_true",
                    help="verify every document (values, hard negatives, reference matcher)")
    args = ap.parse_args(argv)
    _check_templates()

    ref = Reference()
    per_entity, per_lang = Counter(), Counter()
    with_hard = no_entity = 0
    problems: list[str] = []
    with open(args.out, "w", encoding="utf-8") as f:
        for lang, text, spans, hard in generate(args.seed, args.count, ref):
            per_lang[lang] += 1
            per_entity.update(entity for _, _, entity, _ in spans)
            with_hard += bool(hard)
            no_entity += not spans
            if args.check:
                check_document(text, spans, hard, ref, problems)
            doc = {"lang": lang, "text": text,
                   "spans": [{"start": s, "end": e, "entity": x} for s, e, x, _ in spans]}
            f.write(json.dumps(doc, ensure_ascii=False) + "\n")

    if args.check:  # the file as a consumer reads it
        with open(args.out, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                doc = json.loads(line)
                raw, end = doc["text"].encode(), 0
                for sp in doc["spans"]:
                    if not (end <= sp["start"] < sp["end"] <= len(raw)) or sp["entity"] not in ENTITIES:
                        problems.append(f"line {n}: bad span {sp}")
                    try:
                        raw[sp["start"]:sp["end"]].decode()
                    except UnicodeDecodeError:
                        problems.append(f"line {n}: span {sp} cuts a UTF-8 character")
                    end = sp["end"]
        for p in problems[:40]:
            print("CHECK:", p, file=sys.stderr)
        print(f"check: {len(problems)} problem(s)", file=sys.stderr)

    total = sum(per_entity.values())
    print(f"{args.count} documents (en {per_lang['en']}, de {per_lang['de']}, fr {per_lang['fr']}; "
          f"{with_hard} with a hard negative, {no_entity} without entities), {total} spans: "
          + ", ".join(f"{e} {per_entity[e]}" for e in ENTITIES), file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
