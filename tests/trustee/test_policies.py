"""Our Rego policies against upstream's, evaluated on the same inputs (upstream's policy texts are
the independent peer), and the upstream policy-engine test matrix."""

from __future__ import annotations

import copy

import pytest

from coco.errors import RegoError
from coco.rego import RegoPolicy
from coco.trustee.attestation.service import compile_attestation_policy, default_policy_text
from coco.trustee.kbs.app import compile_resource_policy, default_resource_policy
from tests.trustee.conftest import VECTORS

POL = VECTORS / "policies"

SAMPLE = {
    "svn": "1",
    "launch_digest": "abcde",
    "platform_version": {"major": 1, "minor": 4},
    "debug": False,
}
SNP = {
    "measurement": "aa" * 48, "reported_tcb_bootloader": 10, "reported_tcb_tee": 0,
    "reported_tcb_snp": 23, "reported_tcb_microcode": 25, "policy_debug_allowed": False,
    "policy_migrate_ma": False, "platform_smt_enabled": True, "platform_tsme_enabled": False,
    "policy_abi_major": 0, "policy_abi_minor": 0, "policy_single_socket": False, "policy_smt_allowed": True,
}  # fmt: skip
TDX = {
    "quote": {"header": {"tee_type": "81000000", "vendor_id": "939a7233f79c4ca9940a0db3957f0607"},
              "body": {"mr_td": "11" * 48, "rtmr_1": "22" * 48, "rtmr_2": "33" * 48, "xfam": "e742060000000000"}},
    "td_attributes": {"debug": False}, "tcb_status": "UpToDate", "collateral_expiration_status": "0",
    "uefi_event_logs": [
        {"type_name": "EV_EFI_BOOT_SERVICES_APPLICATION", "details": {"device_paths": ["File(kernel)"]},
         "digests": [{"alg": "SHA-384", "digest": "44" * 48}]},
        {"type_name": "EV_EVENT_TAG", "details": {"string": "LOADED_IMAGE::LoadOptions"},
         "digests": [{"alg": "SHA-384", "digest": "55" * 48}]},
    ],
}  # fmt: skip
TPM = {"pcr11": "66" * 32, "ak_public": "AKPUB"}
AZSNP = {**SNP, "tpm": {"pcr11": "77" * 32}}
AZTDX = {**TDX, "tpm": {"pcr11": "88" * 32}}
RVS = {
    "svn": ["1"], "launch_digest": ["abcde"], "major_version": 1, "minimum_minor_version": 1,
    "snp_launch_measurement": ["aa" * 48], "snp_bootloader": [10], "snp_tee_svn": [0],
    "snp_snp_svn": [23], "snp_microcode": [25], "snp_smt_enabled": True, "snp_tsme_enabled": False,
    "snp_guest_abi_major": 0, "snp_guest_abi_minor": 0, "snp_single_socket": False, "snp_smt_allowed": True,
    "rtmr_1": ["22" * 48], "rtmr_2": ["33" * 48], "tdvfkernel": "44" * 48, "tdvfkernelparams": "55" * 48,
    "mr_td": ["11" * 48], "xfam": ["e742060000000000"], "tpm_pcr11": ["66" * 32], "trusted_aks": ["AKPUB"],
    "measurement": ["aa" * 48], "snp_pcr11": ["77" * 32], "tcb_bootloader": [10], "tcb_tee": [0],
    "tcb_snp": [23], "tcb_microcode": [25], "smt_enabled": [True], "tsme_enabled": [False],
    "abi_major": [0], "abi_minor": [0], "single_socket": [False], "smt_allowed": [True],
    "tdx_pcr11": ["88" * 32],
}  # fmt: skip


def _variants() -> list[tuple[str, dict, dict]]:
    cases = []
    for tee, claims in (("sample", SAMPLE), ("snp", SNP), ("tdx", TDX), ("tpm", TPM),
                        ("az-snp-vtpm", AZSNP), ("az-tdx-vtpm", AZTDX), ("se", {"cuid": "x"})):  # fmt: skip
        cases.append((f"{tee}-no-rv", {tee: claims}, {}))
        cases.append((f"{tee}-rv", {tee: claims}, RVS))
    bad_snp = copy.deepcopy(SNP)
    bad_snp["policy_debug_allowed"] = True
    cases.append(("snp-debug", {"snp": bad_snp}, RVS))
    snp_other = copy.deepcopy(SNP)
    snp_other["platform_smt_enabled"] = False
    cases.append(("snp-platform-differs", {"snp": snp_other}, RVS))
    tdx_grub = copy.deepcopy(TDX)
    tdx_grub["uefi_event_logs"] = []
    cases.append(("tdx-no-kernel-event", {"tdx": tdx_grub}, RVS))
    tdx_old = copy.deepcopy(TDX)
    tdx_old["tcb_status"] = "OutOfDate"
    cases.append(("tdx-outofdate", {"tdx": tdx_old}, RVS))
    sample_old = copy.deepcopy(SAMPLE)
    sample_old["platform_version"]["minor"] = 0
    cases.append(("sample-old-minor", {"sample": sample_old}, RVS))
    containers = {"agent_policy_claims": {"containers": [
        {"OCI": {"Annotations": {"io.kubernetes.cri.image-name": "bitnami/nginx:latest"},
                 "Process": {"User": {"UID": 65535}}}},
        {"OCI": {"Annotations": {"io.kubernetes.cri.image-name": "busybox"}, "Process": {"User": {"UID": 1001}}}},
    ]}}  # fmt: skip
    cases.append(("identifiers", {"sample": SAMPLE, "init_data_claims": containers}, RVS))
    return cases


@pytest.fixture(scope="module")
def cpu_policies() -> tuple[RegoPolicy, RegoPolicy]:
    ours = compile_attestation_policy(default_policy_text("default_cpu") or "", "ours")
    theirs = compile_attestation_policy(
        (POL / "as-default" / "ear_default_policy_cpu.rego").read_text(), "upstream"
    )
    return ours, theirs


@pytest.mark.parametrize(("name", "inp", "rvs"), _variants(), ids=[c[0] for c in _variants()])
def test_default_cpu_policy_matches_upstream(cpu_policies, name: str, inp: dict, rvs: dict) -> None:
    ours, theirs = cpu_policies
    a = ours.evaluate(inp, {"reference_values": rvs})
    b = theirs.evaluate(inp, {"reference_values": rvs})
    assert a["trust_claims"] == b["trust_claims"]
    assert a["extensions"] == b["extensions"]
    if name.endswith("-no-rv") and name != "se-no-rv" and name != "tpm-no-rv":
        assert a["trust_claims"]["executables"] == 33


def test_identifiers_extension(cpu_policies) -> None:
    ours, _ = cpu_policies
    inp = dict(_variants()[-1][1])
    ext = ours.evaluate(inp, {"reference_values": RVS})["extensions"]
    assert ext == [{"name": "ear.trustee.identifiers", "key": -18, "value": {"validated": {
        "container_images": ["bitnami/nginx:latest", "busybox"], "container_uids": [65535, 1001]}}}]  # fmt: skip


def _ear(evidence: dict) -> dict:
    return {
        "submods": {"cpu0": {"ear.status": "warning", "ear.veraison.annotated-evidence": evidence}}
    }


@pytest.mark.parametrize(
    ("inp", "data"),
    [
        (
            _ear({"sample": SAMPLE}),
            {"plugin": "resource", "resource-path": ["a", "b", "c"], "query": {}},
        ),
        (_ear({"snp": SNP}), {"plugin": "resource", "resource-path": ["a", "b", "c"], "query": {}}),
        (_ear({"tdx": TDX}), {"plugin": "nebula-ca", "resource-path": ["x"], "query": {}}),
        ({}, {"plugin": "resource", "resource-path": ["a", "b", "c"], "query": {}}),
        (
            _ear({"tpm": TPM}),
            {"plugin": "resource", "resource-path": ["a", "b", "c"], "query": {"v": "1"}},
        ),
    ],
)
def test_default_resource_policy_matches_upstream(inp: dict, data: dict) -> None:
    ours = compile_resource_policy(default_resource_policy())
    theirs = compile_resource_policy((POL / "kbs-resource" / "kbs_default.rego").read_text())
    assert ours.evaluate(inp, data).get("allow") == theirs.evaluate(inp, data).get("allow")


def _pe_input(product: str, svn: object) -> dict:
    return _ear({"sample": {"productId": product, "svn": svn}})


@pytest.mark.parametrize(
    ("policy", "plugin", "path", "product", "svn", "expected"),
    [
        ("policy_1.rego", "resource", ["my_repo", "Alice", "key"], "Alice", "1", True),
        ("policy_1.rego", "another-plugin", ["my_repo", "Alice", "key"], "Alice", "1", False),
        ("policy_1.rego", "resource", ["my_repo", "Alice", "key"], "Bob", "1", False),
        ("policy_4.rego", "resource", ["my_repo", "Alice", "key"], "Alice", "1", True),
        ("policy_3.rego", "resource", ["my_repo", "Alice", "key"], "Alice", "1", False),
        ("policy_5.rego", "resource", ["myrepo", "secret", "secret"], "x", "2", False),
        ("policy_5.rego", "resource", ["myrepo", "secret", "secret1"], "x", "1", False),
        ("policy_5.rego", "resource", ["myrepo", "secret", "secret2"], "x", "2", False),
        ("policy_5.rego", "resource", ["myrepo", "secret", "secret3"], "x", "3", False),
        ("policy_5.rego", "resource", ["a", "b", "secret1"], "x", "3", False),
        ("policy_5.rego", "abc", ["myrepo", "secret", "secret1"], "x", "3", False),
    ],
)
def test_upstream_policy_engine_matrix(policy, plugin, path, product, svn, expected) -> None:
    p = compile_resource_policy((POL / "policy-engine" / policy).read_text())
    got = p.evaluate(
        _pe_input(product, svn), {"plugin": plugin, "resource-path": path, "query": {}}
    )
    assert (got.get("allow") is True) == expected


def test_policy_refusals() -> None:
    with pytest.raises(RegoError, match=r"^resource policy: Rego does not compile: line 2 column"):
        compile_resource_policy("package policy\nallow if {")
    with pytest.raises(RegoError, match=r"^attestation policy x: expected 'package policy'"):
        compile_attestation_policy("package other\nallow := true\n", "x")


@pytest.mark.parametrize(
    ("text", "blind"),
    [
        ("x := input.sample.svn", True),
        ('x := input["az-snp-vtpm"].tpm', True),
        ("x := input", False),
        ("some k in input", False),
        ("x := input[k]", False),
        ("import input", False),
        ('x := object.get(input, "a", 1)', False),
        ("x := input.report_data", False),
        ("import input.sample as s\nx := s.runtime_data_claims", False),
    ],
)
def test_memoization_only_for_policies_blind_to_runtime_data(text: str, blind: bool) -> None:
    from coco.trustee.attestation.service import _blind_to_runtime_data

    assert _blind_to_runtime_data("package policy\n" + text) is blind


def test_memoized_and_unmemoized_evaluations_give_per_request_answers() -> None:
    from cryptography.hazmat.primitives.asymmetric import ec

    from coco.trustee.attestation.ear import TokenSigner
    from coco.trustee.attestation.service import AttestationService
    from coco.trustee.rvps import Rvps
    from coco.trustee.storage import open_store

    store = open_store("memory://")
    svc = AttestationService(
        store, Rvps(store), TokenSigner(ec.generate_private_key(ec.SECP256R1()))
    )
    # Sees the nonce: must never be answered from a cache.
    svc.set_policy("default_cpu", 'package policy\nimport rego.v1\ndefault h := 97\n'
                   'h := 2 if input.runtime_data_claims.nonce == "good"\n'
                   'trust_claims := {"hardware": h}\n')  # fmt: skip
    # Blind to it: memoized, and the answer still follows the reference values.
    svc.set_policy("default_gpu", 'package policy\nimport rego.v1\ndefault h := 97\n'
                   'h := 2 if input.sample.svn in query_reference_value("svn")\n'
                   'trust_claims := {"hardware": h}\n')  # fmt: skip
    pol_cpu, pol_gpu = svc.policy("default_cpu"), svc.policy("default_gpu")
    claims = {"sample": {"svn": "1"}, "report_data": "x"}
    for nonce, want in (("good", 2), ("bad", 97), ("good", 2)):
        out = svc._evaluate(pol_cpu, {**claims, "runtime_data_claims": {"nonce": nonce}}, {})
        assert out["trust_claims"]["hardware"] == want
    for rvs, want in (({}, 97), ({"svn": ["1"]}, 2), ({}, 97)):
        out = svc._evaluate(pol_gpu, {**claims, "runtime_data_claims": {"nonce": "n"}}, rvs)
        assert out["trust_claims"]["hardware"] == want
