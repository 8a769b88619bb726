"""Small, seeded, MIMIC-IV-shaped hospital tables for running PyHealth's real MIMIC-IV pipeline offline.

    from benchmarks.mimic4_tables import write_mimic4_tables
    root = write_mimic4_tables(Path("/tmp/mimic4"), patients=120, seed=0)
    MIMIC4Dataset(ehr_root=str(root), ehr_tables=["patients", "admissions", "diagnoses_icd",
                                                  "procedures_icd", "labevents"], cache_dir=...)

Writes the files, and the MIMIC-IV 2.2 column names, that PyHealth 2.1.0's ``MIMIC4Dataset`` reads for
those tables: ``hosp/{patients, admissions, diagnoses_icd, procedures_icd, labevents, d_labitems}.csv.gz``
and ``icu/icustays.csv.gz`` (the EHR loader always adds ``icustays``; ``labevents`` is joined with
``d_labitems`` on ``itemid``). ``MortalityPredictionStageNetMIMIC4`` keeps adult patients with codes from an
admission before the target one (the death admission, else the last) and at least one lab vector of its
ten categories, so almost every patient here has two or more admissions (a few minors and single-admission
patients are there for the task to drop) and labs of those itemids, plus other itemids that the task filters
out. Lengths are long-tailed: admissions per patient, codes per admission and lab draws per admission.
About 30% of the patients die in their last admission, and the codes
and labs of the ones who die lean towards risk codes and deranged values, so a briefly trained model's
predictions vary. Everything is a function of ``seed``; nothing here is real patient data.
"""
from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import numpy as np
import pandas as pd

# (itemid, label, fluid, category, unit, normal mean, normal sd, shift when dying) per lab: an itemid of
# each of the task's ten categories, a second one for some, and four that the task filters out (50882,
# 50893, 51221, 51301).
LAB_ITEMS = [
    (50983, "Sodium", "Blood", "Chemistry", "mEq/L", 139.0, 3.5, -4.0),
    (50824, "Sodium, Whole Blood", "Blood", "Blood Gas", "mEq/L", 138.0, 4.0, -4.0),
    (50971, "Potassium", "Blood", "Chemistry", "mEq/L", 4.2, 0.5, 0.9),
    (50822, "Potassium, Whole Blood", "Blood", "Blood Gas", "mEq/L", 4.1, 0.6, 0.9),
    (50902, "Chloride", "Blood", "Chemistry", "mEq/L", 102.0, 4.0, 2.0),
    (50882, "Bicarbonate", "Blood", "Chemistry", "mEq/L", 25.0, 3.0, -6.0),
    (50803, "Calculated Bicarbonate, Whole Blood", "Blood", "Blood Gas", "mEq/L", 25.0, 3.0, -6.0),
    (50931, "Glucose", "Blood", "Chemistry", "mg/dL", 125.0, 35.0, 40.0),
    (50893, "Calcium, Total", "Blood", "Chemistry", "mg/dL", 9.0, 0.6, -0.6),
    (50808, "Free Calcium", "Blood", "Blood Gas", "mmol/L", 1.12, 0.08, -0.1),
    (50960, "Magnesium", "Blood", "Chemistry", "mg/dL", 2.0, 0.25, 0.2),
    (50868, "Anion Gap", "Blood", "Chemistry", "mEq/L", 13.0, 2.5, 5.0),
    (50964, "Osmolality, Measured", "Blood", "Chemistry", "mOsm/kg", 290.0, 8.0, 10.0),
    (50970, "Phosphate", "Blood", "Chemistry", "mg/dL", 3.5, 0.7, 1.2),
    (51221, "Hematocrit", "Blood", "Hematology", "%", 33.0, 6.0, -4.0),
    (51301, "White Blood Cells", "Blood", "Hematology", "K/uL", 9.0, 3.5, 6.0),
]

RISK_DIAGNOSES = ["A419", "R6521", "J9601", "N179", "I469", "K7200", "I5023", "C7951"]
COMMON_DIAGNOSES = ["I10", "E785", "E119", "Z794", "K219", "F329", "N390", "J449", "I2510", "E039", "D649", "Z87891",
                    "F17210", "G4733", "M109", "I4891", "E872", "N400", "Z7901", "R0789", "4019", "2724", "25000",
                    "53081", "V5861", "41401", "3051", "42731", "5849", "2859", "311", "27800"]
RISK_PROCEDURES = ["5A1955Z", "0BH17EZ", "5A1D70Z", "02HV33Z"]
COMMON_PROCEDURES = ["3E0G76Z", "0DJ08ZZ", "B211YZZ", "009U3ZX", "4A023N7", "0T9B70Z", "3E033XZ", "9671", "3893",
                     "9904", "8856", "3995"]
ADMISSION_TYPES = ["EW EMER.", "URGENT", "ELECTIVE", "OBSERVATION ADMIT", "DIRECT EMER."]
LOCATIONS = ["EMERGENCY ROOM", "TRANSFER FROM HOSPITAL", "PHYSICIAN REFERRAL", "WALK-IN/SELF REFERRAL"]
DISCHARGES = ["HOME", "HOME HEALTH CARE", "SKILLED NURSING FACILITY"]
CARE_UNITS = ["Medical Intensive Care Unit (MICU)", "Cardiac Vascular Intensive Care Unit (CVICU)",
              "Surgical Intensive Care Unit (SICU)", "Trauma SICU (TSICU)"]
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
# MIMIC-IV 2.2's columns, in its order (a table may have no rows in a tiny cohort, yet keeps its header)
COLUMNS = {
    "patients": ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"],
    "admissions": ["subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type",
                   "admit_provider_id", "admission_location", "discharge_location", "insurance", "language",
                   "marital_status", "race", "edregtime", "edouttime", "hospital_expire_flag"],
    "diagnoses_icd": ["subject_id", "hadm_id", "seq_num", "icd_code", "icd_version"],
    "procedures_icd": ["subject_id", "hadm_id", "seq_num", "chartdate", "icd_code", "icd_version"],
    "labevents": ["labevent_id", "subject_id", "hadm_id", "specimen_id", "itemid", "order_provider_id", "charttime",
                  "storetime", "value", "valuenum", "valueuom", "ref_range_lower", "ref_range_upper", "flag",
                  "priority", "comments"],
    "icustays": ["subject_id", "hadm_id", "stay_id", "first_careunit", "last_careunit", "intime", "outtime", "los"],
    "d_labitems": ["itemid", "label", "fluid", "category"],
}


def long_tail(rng: np.random.Generator, low: int, scale: float, cap: int) -> int:
    """An integer in [low, cap] with a Pareto tail: most are small, a few are long."""
    return int(min(cap, low + np.floor(rng.pareto(1.6) * scale)))


def stamp(moment: datetime) -> str:
    return moment.strftime(TIME_FORMAT)


def patient_row(rng: np.random.Generator, subject_id: int, anchor_year: int, death: datetime | None) -> dict:
    adult = rng.random() > 0.03  # a few minors, whom the task drops
    return {
        "subject_id": subject_id, "gender": rng.choice(["F", "M"]),
        "anchor_age": int(rng.integers(45, 91) if adult else rng.integers(1, 18)),
        "anchor_year": anchor_year,
        "anchor_year_group": rng.choice(["2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019"]),
        "dod": death.strftime("%Y-%m-%d") if death is not None else "",
    }


def admission_times(rng: np.random.Generator, anchor_year: int, count: int,
                    died: bool) -> list[tuple[datetime, datetime]]:
    """(admittime, dischtime) per admission, in order, months apart; a death stay tends to be short."""
    start = datetime(anchor_year, 1, 1) + timedelta(days=float(rng.uniform(0, 300)))
    times = []
    for index in range(count):
        admit = start + timedelta(hours=float(rng.uniform(0, 23)), minutes=int(rng.integers(0, 60)))
        last = index == count - 1
        stay_days = rng.lognormal(0.6 if died and last else 1.2, 0.7)
        discharge = admit + timedelta(days=float(max(0.3, min(stay_days, 40.0))))
        times.append((admit.replace(second=0, microsecond=0), discharge.replace(second=0, microsecond=0)))
        start = discharge + timedelta(days=float(rng.uniform(20, 400)))
    return times


def admission_row(rng: np.random.Generator, subject_id: int, hadm_id: int, times: tuple[datetime, datetime],
                  expired: bool) -> dict:
    admit, discharge = times
    return {
        "subject_id": subject_id, "hadm_id": hadm_id, "admittime": stamp(admit), "dischtime": stamp(discharge),
        "deathtime": stamp(discharge) if expired else "", "admission_type": rng.choice(ADMISSION_TYPES),
        "admit_provider_id": f"P{int(rng.integers(10000, 99999))}", "admission_location": rng.choice(LOCATIONS),
        "discharge_location": "DIED" if expired else rng.choice(DISCHARGES),
        "insurance": rng.choice(["Medicare", "Medicaid", "Other"]), "language": "ENGLISH",
        "marital_status": rng.choice(["MARRIED", "SINGLE", "WIDOWED", "DIVORCED"]),
        "race": rng.choice(["WHITE", "BLACK/AFRICAN AMERICAN", "HISPANIC/LATINO - PUERTO RICAN", "ASIAN", "OTHER"]),
        "edregtime": stamp(admit - timedelta(hours=3)), "edouttime": stamp(admit + timedelta(minutes=30)),
        "hospital_expire_flag": int(expired),
    }


def pick_codes(rng: np.random.Generator, count: int, common: list[str], risky: list[str], risk: float) -> list[str]:
    """``count`` distinct codes; each is a risk code with probability ``risk``."""
    chosen: list[str] = []
    for _ in range(count):
        pool = risky if rng.random() < risk else common
        code = str(rng.choice(pool))
        if code not in chosen:
            chosen.append(code)
    return chosen


def icd_version(code: str) -> int:
    """9 for the ICD-9 codes of these lists (digits, or V and digits), 10 for the ICD-10 ones."""
    return 9 if code.isdigit() or code.startswith("V") else 10


def code_rows(rng: np.random.Generator, subject_id: int, hadm_id: int, times: tuple[datetime, datetime],
              risk: float) -> tuple[list[dict], list[dict]]:
    """Diagnoses (1 to 39, long-tailed) and procedures (0 to 12) of one admission."""
    diagnoses = pick_codes(rng, long_tail(rng, 1, 3.0, 39), COMMON_DIAGNOSES, RISK_DIAGNOSES, risk)
    procedures = pick_codes(rng, long_tail(rng, 0, 1.5, 12), COMMON_PROCEDURES, RISK_PROCEDURES, risk)
    diag = [{"subject_id": subject_id, "hadm_id": hadm_id, "seq_num": i + 1, "icd_code": code,
             "icd_version": icd_version(code)} for i, code in enumerate(diagnoses)]
    proc = [{"subject_id": subject_id, "hadm_id": hadm_id, "seq_num": i + 1,
             "chartdate": times[0].strftime("%Y-%m-%d"), "icd_code": code, "icd_version": icd_version(code)}
            for i, code in enumerate(procedures)]
    return diag, proc


def lab_rows(rng: np.random.Generator, subject_id: int, hadm_id: int, times: tuple[datetime, datetime],
             severity: float, first_id: int) -> list[dict]:
    """Lab draws (1 to 30 per admission, long-tailed) between admission and discharge; each draw measures
    a random subset of the items; values drift by ``severity`` times each item's dying shift."""
    admit, discharge = times
    hours = max((discharge - admit).total_seconds() / 3600.0 - 1.0, 0.5)
    draws = long_tail(rng, 1, 1.5, 30)
    offsets = np.sort(rng.uniform(0.0, hours, size=draws))
    offsets[0] = min(offsets[0], float(rng.uniform(0.5, 6.0)), hours)  # a first draw early in the stay
    rows = []
    for offset in offsets:
        charttime = (admit + timedelta(hours=float(offset))).replace(second=0, microsecond=0)
        specimen = int(rng.integers(10_000_000, 99_999_999))
        for itemid, _label, _fluid, _cat, unit, mean, sd, shift in LAB_ITEMS:
            if rng.random() > 0.55:
                continue
            value = round(float(rng.normal(mean + severity * shift, sd)), 2 if mean < 10 else 1)
            low, high = mean - 2 * sd, mean + 2 * sd
            rows.append({
                "labevent_id": first_id + len(rows), "subject_id": subject_id, "hadm_id": hadm_id,
                "specimen_id": specimen, "itemid": itemid, "order_provider_id": "", "charttime": stamp(charttime),
                "storetime": stamp(charttime + timedelta(minutes=int(rng.integers(20, 150)))),
                "value": f"{value:g}", "valuenum": value, "valueuom": unit, "ref_range_lower": round(low, 2),
                "ref_range_upper": round(high, 2), "flag": "abnormal" if not low <= value <= high else "",
                "priority": rng.choice(["ROUTINE", "STAT"]), "comments": "",
            })
    return rows


def icustay_row(rng: np.random.Generator, subject_id: int, hadm_id: int, times: tuple[datetime, datetime],
                stay_id: int) -> dict:
    admit, discharge = times
    intime = admit + (discharge - admit) * float(rng.uniform(0.0, 0.3))
    outtime = intime + (discharge - intime) * float(rng.uniform(0.3, 0.9))
    unit = rng.choice(CARE_UNITS)
    return {"subject_id": subject_id, "hadm_id": hadm_id, "stay_id": stay_id, "first_careunit": unit,
            "last_careunit": unit, "intime": stamp(intime), "outtime": stamp(outtime),
            "los": round((outtime - intime).total_seconds() / 86400.0, 4)}


def patient_tables(rng: np.random.Generator, subject_id: int, first_hadm: int, first_lab: int) -> dict[str, list]:
    """Every table's rows for one patient."""
    died = bool(rng.random() < 0.3)
    count = long_tail(rng, 2, 1.0, 12) if rng.random() > 0.04 else 1  # a few single-admission patients
    anchor_year = int(rng.integers(2110, 2190))
    times = admission_times(rng, anchor_year, count, died)
    frailty = float(rng.beta(2, 5))  # survivors can look sick too: the label is not a lookup
    death = times[-1][1] if died else None
    rows: dict[str, list] = {"patients": [patient_row(rng, subject_id, anchor_year, death)], "admissions": [],
                             "diagnoses_icd": [], "procedures_icd": [], "labevents": [], "icustays": []}
    for index, stay in enumerate(times):
        hadm_id = first_hadm + index
        last = index == count - 1
        severity = frailty + (0.8 if died and last else 0.0) + (0.3 if died else 0.0)
        rows["admissions"].append(admission_row(rng, subject_id, hadm_id, stay, died and last))
        diag, proc = code_rows(rng, subject_id, hadm_id, stay, risk=min(0.9, 0.05 + 0.5 * severity))
        rows["diagnoses_icd"] += diag
        rows["procedures_icd"] += proc
        rows["labevents"] += lab_rows(rng, subject_id, hadm_id, stay, severity,
                                      first_lab + len(rows["labevents"]))
        if rng.random() < 0.25 + 0.5 * severity:
            rows["icustays"].append(icustay_row(rng, subject_id, hadm_id, stay, 30_000_000 + hadm_id % 10_000_000))
    return rows


def write_mimic4_tables(root: Path, patients: int = 120, seed: int = 0) -> Path:
    """Write seeded MIMIC-IV-shaped tables under ``root`` and return ``root`` (pass it as ``ehr_root``).

    Args:
        root: folder to write into; ``hosp/`` and ``icu/`` are created in it (existing files are replaced).
        patients: number of subjects; about 95% of them yield a sample of
            ``MortalityPredictionStageNetMIMIC4`` (115 of 120 at seed 0; the rest are minors or have a single
            admission).
        seed: seed of every random choice: the same seed writes the same table contents.

    Returns:
        ``root``, holding ``hosp/{patients,admissions,diagnoses_icd,procedures_icd,labevents,d_labitems}.csv.gz``
        and ``icu/icustays.csv.gz`` with MIMIC-IV 2.2's column names.
    """
    rng = np.random.default_rng(seed)
    tables: dict[str, list] = {name: [] for name in COLUMNS}
    tables["d_labitems"] = [dict(zip(COLUMNS["d_labitems"], item[:4], strict=True)) for item in LAB_ITEMS]
    next_hadm, next_lab = 20_000_000, 1
    for index in range(patients):
        rows = patient_tables(rng, 10_000_000 + index, next_hadm, next_lab)
        next_hadm += len(rows["admissions"])
        next_lab += len(rows["labevents"])
        for name, table_rows in rows.items():
            tables[name].extend(table_rows)
    root = Path(root)
    (root / "hosp").mkdir(parents=True, exist_ok=True)
    (root / "icu").mkdir(parents=True, exist_ok=True)
    for name, table_rows in tables.items():
        frame = pd.DataFrame(table_rows, columns=COLUMNS[name])
        folder = "icu" if name == "icustays" else "hosp"
        # mtime=0: the same seed writes byte-identical files
        frame.to_csv(root / folder / f"{name}.csv.gz", index=False, compression={"method": "gzip", "mtime": 0})
    return root
