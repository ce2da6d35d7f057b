"""The CPU name every figure carries."""

import platform

from grpo_fast.machine import cpu_model

TWO_CPUS = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
stepping\t: 1
flags\t\t: fpu avx512f

processor\t: 1
cpu family\t: 25
model\t\t: 1
model name\t: Another CPU
stepping\t: 0
"""


def test_the_first_cpu_is_named_with_its_family_model_and_stepping(tmp_path):
    (tmp_path / "cpuinfo").write_text(TWO_CPUS)
    assert cpu_model(tmp_path / "cpuinfo") == "AMD EPYC (family 26, model 2, stepping 1)"


def test_a_name_without_family_stays_as_it_is(tmp_path):
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nmodel name\t: Neoverse-V2\n")
    assert cpu_model(tmp_path / "cpuinfo") == "Neoverse-V2"


def test_without_cpuinfo_the_platform_names_the_processor(tmp_path):
    assert cpu_model(tmp_path / "missing") == (platform.processor() or platform.machine())


def test_this_machine_is_named():
    assert cpu_model()
