# Agent policy rules of the coco project (our own wording of the checks the Kata agent makes).
#
# Every request the host sends to the agent is evaluated as data.agent_policy.<RequestName>.
# The checks are written as lists of violations ({rule, field, expected, got}); a request is
# allowed when its list is empty, so a denial can always say which rule and which field failed
# (query data.agent_policy.why_<RequestName>).
#
# The data (policy_data) follows the structure genpolicy writes: containers (OCI fields and
# storages: an image_guest_pull storage naming the pod's image, or tardev layers with their
# dm-verity root hashes), sandbox, common and request_defaults.
package agent_policy

import future.keywords.every
import future.keywords.in

# ---------------------------------------------------------------------------------------------
# Requests that carry nothing the host could abuse are allowed; the rest are refused unless a
# rule below says otherwise.

default AddARPNeighborsRequest := false
default AddSwapRequest := false
default CloseStdinRequest := false
default CopyFileRequest := false
default CreateContainerRequest := false
default CreateSandboxRequest := false
default DestroySandboxRequest := true
default ExecProcessRequest := false
default GetOOMEventRequest := true
default GuestDetailsRequest := true
default ListInterfacesRequest := false
default ListRoutesRequest := false
default MemHotplugByProbeRequest := false
default OnlineCPUMemRequest := true
default PauseContainerRequest := false
default ReadStreamRequest := false
default RemoveContainerRequest := true
default RemoveStaleVirtiofsShareMountsRequest := true
default ReseedRandomDevRequest := false
default ResumeContainerRequest := false
default SetGuestDateTimeRequest := false
default SetPolicyRequest := false
default SignalProcessRequest := true
default StartContainerRequest := true
default StartTracingRequest := false
default StatsContainerRequest := true
default StopTracingRequest := false
default TtyWinResizeRequest := true
default UpdateContainerRequest := false
default UpdateEphemeralMountsRequest := false
default UpdateInterfaceRequest := true
default UpdateRoutesRequest := true
default WaitProcessRequest := true
default WriteStreamRequest := false
default AllowRequestsFailingPolicy := false

# Switches the policy author sets in request_defaults.
CloseStdinRequest {
	policy_data.request_defaults.CloseStdinRequest == true
}

ReadStreamRequest {
	policy_data.request_defaults.ReadStreamRequest == true
}

UpdateEphemeralMountsRequest {
	policy_data.request_defaults.UpdateEphemeralMountsRequest == true
}

WriteStreamRequest {
	policy_data.request_defaults.WriteStreamRequest == true
}

violation(rule, field, expected, got) := {"rule": rule, "field": field, "expected": expected, "got": got}

# ---------------------------------------------------------------------------------------------
# Placeholders: the policy writes values the host only knows at run time as $(name).

input_annotations := object.get(object.get(input, "OCI", {}), "Annotations", {})

# The bundle directory's name (the container id); the policy's bundle_path annotation pins the
# directory it is in (containerd's default, or the node's own in the settings).
bundle_path_parts := split(object.get(input_annotations, "io.katacontainers.pkg.oci.bundle_path", ""), "/")

bundle_id := bundle_path_parts[count(bundle_path_parts) - 1]

sandbox_id := object.get(input_annotations, "io.kubernetes.cri.sandbox-id", "")

sandbox_name := object.get(input_annotations, "io.kubernetes.cri.sandbox-name", "")

sandbox_namespace := object.get(input_annotations, "io.kubernetes.cri.sandbox-namespace", "")

subst(s) := out {
	a := replace(s, "$(sfprefix)", policy_data.common.sfprefix)
	b := replace(a, "$(cpath)", policy_data.common.cpath)
	c := replace(b, "$(bundle-id)", bundle_id)
	d := replace(c, "$(sandbox-id)", sandbox_id)
	e := replace(d, "$(spath)", object.get(policy_data.common, "spath", "/run/kata-containers/sandbox/storage"))
	f := replace(e, "$(sandbox-name)", sandbox_name)
	g := replace(f, "$(sandbox-namespace)", sandbox_namespace)
	out := replace(g, "$(generated-name)", "[a-z0-9]([-a-z0-9]*[a-z0-9])?")
}

# A policy value matches when equal after substitution, or, if it is a regex (starts with ^),
# when the value matches it.
value_matches(pattern, got) {
	subst(pattern) == got
}

value_matches(pattern, got) {
	p := subst(pattern)
	startswith(p, "^")
	regex.match(p, got)
}

value_matches(pattern, got) {
	contains(pattern, "$(generated-name)")
	not startswith(pattern, "^")
	regex.match(concat("", ["^", subst(pattern), "$"]), got)
}

# ---------------------------------------------------------------------------------------------
# CreateContainerRequest

CreateContainerRequest {
	count(why_CreateContainerRequest) == 0
}

why_CreateContainerRequest := array.concat(ccr_input_violations, ccr_best)

ccr_input_violations := array.concat(
	[viol | not is_null(input.OCI.Hooks); viol := violation("input", "OCI.Hooks", null, input.OCI.Hooks)],
	[viol | not is_null(input.OCI.Linux.Seccomp); viol := violation("input", "OCI.Linux.Seccomp", null, input.OCI.Linux.Seccomp)],
)

# The policy container the request is compared with: the one with the fewest violations, a
# container whose identity (container type and name) matches coming first.
ccr_scores := [s |
	some p in policy_data.containers
	vs := container_violations(p)
	s := {"score": count(vs) + identity_penalty(p), "violations": vs}
]

# (not min(): rego-cpp min compares these numbers as text)
ccr_lowest := [vs |
	some s in ccr_scores
	not lower_score(s.score)
	vs := s.violations
]

ccr_best := ccr_lowest[0]

lower_score(x) {
	some t in ccr_scores
	t.score < x
}

ccr_best := [violation("containers", "policy_data.containers", "at least one container", "none")] {
	count(policy_data.containers) == 0
}

identity_keys := ["io.kubernetes.cri.container-type", "io.kubernetes.cri.container-name"]

identity_penalty(p) := 1000 * count([k |
	some k in identity_keys
	object.get(p.OCI.Annotations, k, "") != object.get(input_annotations, k, "")
])

container_violations(p) := vs {
	groups := [
		[viol | p.sandbox_pidns != input.sandbox_pidns; viol := violation("sandbox_pidns", "sandbox_pidns", p.sandbox_pidns, input.sandbox_pidns)],
		[viol | p.OCI.Version != input.OCI.Version; viol := violation("version", "OCI.Version", p.OCI.Version, input.OCI.Version)],
		annotation_violations(p),
		identity_violations(p),
		root_violations(p),
		process_violations(p),
		storage_violations(p),
		mount_violations(p),
		linux_violations(p),
	]
	vs := [v | some g in groups; some v in g]
}

# --- annotations

# The pod's identity is reported before the values derived from it.
identity_annotations := [
	"io.kubernetes.cri.sandbox-name",
	"io.kubernetes.cri.sandbox-namespace",
	"io.kubernetes.cri.container-type",
	"io.kubernetes.cri.container-name",
]

annotation_violations(p) := array.concat(array.concat(wrong_identity, unknown_keys), wrong_values) {
	p_anno := object.get(p.OCI, "Annotations", {})
	unknown_keys := [viol |
		some k
		v := input_annotations[k]
		not startswith(k, "io.kubernetes.cri.")
		not k in object.keys(p_anno)
		viol := violation("annotations", sprintf("OCI.Annotations[%s]", [k]), "no such key (not in the policy and not io.kubernetes.cri.*)", v)]
	wrong_identity := [viol |
		some k in identity_annotations
		pv := p_anno[k]
		not annotation_ok(k, pv)
		viol := violation("annotations", sprintf("OCI.Annotations[%s]", [k]), subst(pv), object.get(input_annotations, k, null))
	]
	wrong_values := [viol |
		some k
		pv := p_anno[k]
		not k in identity_annotations
		not annotation_ok(k, pv)
		viol := violation(annotation_rule(k), sprintf("OCI.Annotations[%s]", [k]), subst(pv), object.get(input_annotations, k, null))
	]
}

annotation_rule(k) := "image" {
	k == "io.kubernetes.cri.image-name"
}

annotation_rule(k) := "annotations" {
	k != "io.kubernetes.cri.image-name"
}

annotation_ok(k, pv) {
	value_matches(pv, input_annotations[k])
}

annotation_ok(k, pv) {
	k == "nerdctl/network-namespace"
	not k in object.keys(input_annotations)
}

annotation_ok(k, pv) {
	k == "io.kubernetes.cri.image-name"
	image_ok(pv, input_annotations[k])
}

# --- image references, normalized as the guest's puller does (docker.io and library/ implied,
# tag latest when neither tag nor digest is given). A reference the pod pins by digest must
# carry that digest (its tag, if any, the pod's); one it names by tag must carry that tag and no
# digest (the host may not pick another image of the repository).

image_ok(want, got) {
	w := image_ref(want)
	g := image_ref(got)
	w.name == g.name
	w.digest != ""
	g.digest == w.digest
	tag_ok(w.tag, g.tag)
}

image_ok(want, got) {
	w := image_ref(want)
	g := image_ref(got)
	w.name == g.name
	w.digest == ""
	g.digest == ""
	tag_or_latest(g.tag) == tag_or_latest(w.tag)
}

tag_ok(want, got) {
	got == ""
}

tag_ok(want, got) {
	got == want
}

tag_or_latest(t) := "latest" {
	t == ""
}

tag_or_latest(t) := t {
	t != ""
}

image_ref(ref) := {"name": ref_name(ref_repo(body)), "tag": ref_tag(body), "digest": ref_digest(ref)} {
	body := split(ref, "@")[0]
}

ref_digest(ref) := split(ref, "@")[1] {
	contains(ref, "@")
}

ref_digest(ref) := "" {
	not contains(ref, "@")
}

ref_last(body) := parts[count(parts) - 1] {
	parts := split(body, "/")
}

ref_tag(body) := split(ref_last(body), ":")[1] {
	contains(ref_last(body), ":")
}

ref_tag(body) := "" {
	not contains(ref_last(body), ":")
}

ref_repo(body) := substring(body, 0, (count(body) - count(ref_tag(body))) - 1) {
	contains(ref_last(body), ":")
}

ref_repo(body) := body {
	not contains(ref_last(body), ":")
}

ref_has_domain(repo) {
	parts := split(repo, "/")
	count(parts) > 1
	ref_is_domain(parts[0])
}

ref_is_domain(s) {
	contains(s, ".")
}

ref_is_domain(s) {
	contains(s, ":")
}

ref_is_domain(s) {
	s == "localhost"
}

ref_name(repo) := docker_name(repo) {
	ref_has_domain(repo)
}

ref_name(repo) := docker_name(concat("/", ["docker.io", repo])) {
	not ref_has_domain(repo)
}

docker_hosts := {"docker.io", "index.docker.io"}

docker_name(n) := concat("/", ["docker.io", "library", parts[1]]) {
	parts := split(n, "/")
	parts[0] in docker_hosts
	count(parts) == 2
}

docker_name(n) := concat("/", array.concat(["docker.io"], array.slice(parts, 1, count(parts)))) {
	parts := split(n, "/")
	parts[0] in docker_hosts
	count(parts) > 2
}

docker_name(n) := n {
	not split(n, "/")[0] in docker_hosts
}

# --- ids that must agree with each other: the bundle is the container's, the sandbox's bundle
# is the sandbox id, and the log directory belongs to the pod uid.

identity_violations(p) := array.concat(array.concat(cid, sid), uid) {
	cid := [viol |
		is_string(input.container_id)
		input.container_id != bundle_id
		viol := violation("ids", "container_id", bundle_id, input.container_id)
	]
	sid := [viol |
		object.get(p.OCI.Annotations, "io.kubernetes.cri.container-type", "") == "sandbox"
		sandbox_id != bundle_id
		viol := violation("ids", "OCI.Annotations[io.kubernetes.cri.sandbox-id]", bundle_id, sandbox_id)
	]
	uid := [viol |
		pod_uid := input_annotations["io.kubernetes.cri.sandbox-uid"]
		log_dir := input_annotations["io.kubernetes.cri.sandbox-log-directory"]
		not endswith(log_dir, concat("", ["_", pod_uid]))
		viol := violation("ids", "OCI.Annotations[io.kubernetes.cri.sandbox-uid]", "the uid the log directory ends with", pod_uid)
	]
}

# --- root

root_violations(p) := array.concat(
	[viol | p.OCI.Root.Readonly != input.OCI.Root.Readonly; viol := violation("root", "OCI.Root.Readonly", p.OCI.Root.Readonly, input.OCI.Root.Readonly)],
	[viol | not value_matches(p.OCI.Root.Path, input.OCI.Root.Path); viol := violation("root", "OCI.Root.Path", subst(p.OCI.Root.Path), input.OCI.Root.Path)],
)

# --- process

process_violations(p) := vs {
	pp := p.OCI.Process
	ip := input.OCI.Process
	groups := [
		[viol | some f in ["Terminal", "Cwd", "NoNewPrivileges"]; pp[f] != ip[f]; viol := violation("process", sprintf("OCI.Process.%s", [f]), pp[f], ip[f])],
		[viol | pp.User.UID != ip.User.UID; viol := violation("user", "OCI.Process.User.UID", pp.User.UID, ip.User.UID)],
		caps_violations(pp, ip),
		args_violations(pp, ip),
		env_violations(pp, ip),
	]
	vs := [v | some g in groups; some v in g]
}

expand_caps(caps) := policy_data.common.default_caps {
	caps == ["$(default_caps)"]
}

expand_caps(caps) := policy_data.common.privileged_caps {
	caps == ["$(privileged_caps)"]
}

expand_caps(caps) := caps {
	caps != ["$(default_caps)"]
	caps != ["$(privileged_caps)"]
}

caps_violations(pp, ip) := [viol |
	some s in ["Ambient", "Bounding", "Effective", "Inheritable", "Permitted"]
	want := expand_caps(object.get(pp.Capabilities, s, []))
	got := object.get(object.get(ip, "Capabilities", {}), s, [])
	{c | some c in want} != {c | some c in got}
		viol := violation("capabilities", sprintf("OCI.Process.Capabilities.%s", [s]), want, got)]

args_violations(pp, ip) := [violation("args", "OCI.Process.Args", sprintf("%d arguments", [count(pp.Args)]), sprintf("%d arguments", [count(ip.Args)]))] {
	count(pp.Args) != count(ip.Args)
}

args_violations(pp, ip) := [viol |
	some i
		a := ip.Args[i]
	not arg_ok(pp.Args[i], a)
		viol := violation("args", sprintf("OCI.Process.Args[%d]", [i]), pp.Args[i], a)] {
	count(pp.Args) == count(ip.Args)
}

arg_ok(pa, a) {
	pa == a
}

arg_ok(pa, a) {
	replace(pa, "$$", "$") == a
}

arg_ok(pa, a) {
	replace(pa, "$(sandbox-name)", sandbox_name) == a
}

arg_ok(pa, a) {
	contains(pa, "$(node-name)")
}

env_violations(pp, ip) := [viol |
	some i
		e := ip.Env[i]
	not env_ok(pp.Env, e)
		viol := violation("env", sprintf("OCI.Process.Env[%d]", [i]), "a variable the policy lists or allows", e)]

env_ok(penv, e) {
	e in penv
}

env_ok(penv, e) {
	some pe in penv
	replace(pe, "$(sandbox-name)", sandbox_name) == e
}

env_ok(penv, e) {
	some r in object.get(object.get(policy_data.request_defaults, "CreateContainerRequest", {}), "allow_env_regex", [])
	regex.match(expand_env_regex(r), e)
}

env_ok(penv, e) {
	some pe in penv
	some ph in ["$(pod-ip)", "$(host-ip)"]
	endswith(pe, concat("", ["=", ph]))
	name := trim_suffix(pe, ph)
	startswith(e, name)
	regex.match(concat("", ["^", policy_data.common.ipv4_a, "$"]), trim_prefix(e, name))
}

env_ok(penv, e) {
	some pe in penv
	some ph in ["$(host-name)", "$(node-name)", "$(pod-uid)", "$(resource-field)", "$(todo-annotation)"]
	contains(pe, ph)
	name := split(pe, "=")[0]
	startswith(e, concat("", [name, "="]))
}

expand_env_regex(r) := out {
	a := replace(r, "$(ipv4_a)", policy_data.common.ipv4_a)
	b := replace(a, "$(ip_p)", policy_data.common.ip_p)
	c := replace(b, "$(svc_name)", object.get(policy_data.common, "svc_name", "[A-Z0-9_\\.\\-]+"))
	out := replace(c, "$(dns_label)", policy_data.common.dns_label)
}

# --- mounts

mount_violations(p) := [v |
	some i
		m := input.OCI.Mounts[i]
	not mount_ok(p.OCI.Mounts, m)
	v := mount_violation(p.OCI.Mounts, i, m)
]

mount_ok(pmounts, m) {
	some pm in pmounts
	pm.destination == m.destination
	pm.type_ == m.type_
	pm.options == m.options
	value_matches(pm.source, m.source)
}

mount_violation(pmounts, i, m) := violation("mounts", sprintf("OCI.Mounts[%d] (%s)", [i, m.destination]), "a destination the policy lists", m.destination) {
	not m.destination in {pm.destination | some pm in pmounts}
}

# (the policy may list several forms of one destination: the shims send /dev/shm differently)
mount_violation(pmounts, i, m) := violation("mounts", sprintf("OCI.Mounts[%d] (%s)", [i, m.destination]), one_or_all(wants), got) {
	wants := [w |
		some pm in pmounts
		pm.destination == m.destination
		w := {"source": subst(pm.source), "type_": pm.type_, "options": pm.options}
	]
	count(wants) > 0
	got := {"source": m.source, "type_": m.type_, "options": m.options}
}

one_or_all(xs) := xs[0] {
	count(xs) == 1
}

one_or_all(xs) := xs {
	count(xs) != 1
}

# --- storages (the image layers and their dm-verity root hashes)

layer_dir := "/run/kata-containers/sandbox/layers/"

layer_opts := ["ro", "io.katacontainers.fs-opt.block_device=file", "io.katacontainers.fs-opt.is-layer"]

storage_violations(p) := [violation("storages", "storages", sprintf("%d storages", [count(p.storages)]), sprintf("%d storages", [count(input.storages)]))] {
	count(p.storages) != count(input.storages)
}

storage_violations(p) := [v |
	some i
		s := input.storages[i]
	some v in storage_result(p, i, s)
] {
	count(p.storages) == count(input.storages)
}

storage_result(p, i, s) := storage_check(p, i, s)

# A storage no check applies to (a tardev layer where the policy has the guest pull the image,
# say) is refused, never let through.
storage_result(p, i, s) := [violation("storages", sprintf("storages[%d] (%s)", [i, s.mount_point]), "a storage the policy lists", s.driver)] {
	not storage_check(p, i, s)
}

# image_guest_pull: the guest pulls the container's image (the pause container: its own bundle).
storage_check(p, i, s) := vs {
	s.driver == "image_guest_pull"
	pulls := [ps | some ps in p.storages; ps.driver == "image_guest_pull"]
	vs := guest_pull_violations(i, s, pulls)
}

guest_pull_violations(i, s, pulls) := [violation("storages", sprintf("storages[%d] (%s)", [i, s.mount_point]), "no image_guest_pull storage: the policy binds this container's root to its layers", s.source)] {
	count(pulls) == 0
}

guest_pull_violations(i, s, pulls) := vs {
	ps := pulls[0]
	src := [viol | not source_ok(ps.source, s.source); viol := violation("image", sprintf("storages[%d].source", [i]), ps.source, s.source)]
	shape := [viol |
		some f in ["fstype", "options", "fs_group"]
		object.get(s, f, null) != ps[f]
		viol := violation("storages", sprintf("storages[%d].%s", [i, f]), ps[f], object.get(s, f, null))
	]
	mp := [viol | not value_matches(ps.mount_point, s.mount_point); viol := violation("storages", sprintf("storages[%d].mount_point", [i]), subst(ps.mount_point), s.mount_point)]
	vs := array.concat(array.concat(src, shape), array.concat(mp, guest_pull_metadata_violations(i, s)))
}

source_ok(want, got) {
	want == "pause"
	got == "pause"
}

source_ok(want, got) {
	want != "pause"
	image_ok(want, got)
}

# The one driver option carries the container's metadata (its annotations, which the agent
# reads: a container-type there must be the container's own; containerd's snapshot labels).
guest_pull_metadata(s) := md {
	count(s.driver_options) == 1
	startswith(s.driver_options[0], "image_guest_pull=")
	text := trim_prefix(s.driver_options[0], "image_guest_pull=")
	json.is_valid(text)
	md := json.unmarshal(text).metadata
	is_object(md)
}

guest_pull_metadata_violations(i, s) := [violation("storages", sprintf("storages[%d].driver_options", [i]), "one option image_guest_pull=<JSON with a metadata object>", s.driver_options)] {
	not guest_pull_metadata(s)
}

guest_pull_metadata_violations(i, s) := [viol |
	some k
	v := md[k]
	not metadata_ok(k, v)
	viol := violation("storages", sprintf("storages[%d].driver_options metadata[%s]", [i, k]), object.get(input_annotations, k, "a containerd.io/snapshot/ label or an annotation of the container"), v)
] {
	md := guest_pull_metadata(s)
}

metadata_ok(k, v) {
	input_annotations[k] == v
}

metadata_ok(k, v) {
	startswith(k, "containerd.io/snapshot/")
}

policy_overlay(p) := [s | some s in p.storages; s.driver == "overlayfs"][0]

layer_ids(p) := split(policy_overlay(p).options[0], ":")

root_hashes(p) := split(policy_overlay(p).options[1], ":")

# blk/tar: one image layer; its mount point names the layer, its options carry the root hash.
storage_check(p, i, s) := vs {
	s.driver == "blk"
	ids := layer_ids(p)
	hashes := root_hashes(p)
	idx := [j | some j; id := ids[j]; s.mount_point == concat("", [layer_dir, id])]
	vs := layer_storage_violations(i, s, idx, hashes)
}

layer_storage_violations(i, s, idx, hashes) := vs {
	missing := [viol | count(idx) == 0; viol := violation("storages", sprintf("storages[%d].mount_point", [i]), "a layer of the policy", s.mount_point)]
	wanted := [w |
		some j in idx
		w := array.concat(layer_opts, [concat("", ["io.katacontainers.fs-opt.root-hash=", hashes[j]])])
	]
	kind := [viol |
		some f
		w := {"fstype": "tar", "driver_options": []}[f]
		s[f] != w
		viol := violation("storages", sprintf("storages[%d].%s", [i, f]), w, s[f])]
	opts := [viol |
		count(wanted) > 0
		count(s.options) != count(wanted[0])
		viol := violation("storages", sprintf("storages[%d].options", [i]), wanted[0], s.options)
	]
	opt := [viol |
		count(wanted) > 0
		count(s.options) == count(wanted[0])
		some j in numbers.range(0, count(s.options) - 1)
		w := wanted[0][j]
		got := s.options[j]
		got != w
		viol := violation("storages", sprintf("storages[%d].options[%d]", [i, j]), w, got)
	]
	vs := array.concat(array.concat(missing, kind), array.concat(opts, opt))
}

# overlayfs: the container root, stacked from the layers above, topmost first.
storage_check(p, i, s) := vs {
	s.driver == "overlayfs"
	po := policy_overlay(p)
	ids := layer_ids(p)
	hashes := root_hashes(p)
	n := count(ids)
	want := array.concat(
		array.concat(["io.katacontainers.fs-opt.layer-src-prefix=/var/lib/containerd/io.containerd.snapshotter.v1.tardev/layers"], layer_options(ids, hashes)),
		["io.katacontainers.fs-opt.overlay-rw", concat("", ["lowerdir=", po.options[0]])],
	)
	count_v := [viol | count(want) != count(s.options); viol := violation("storages", sprintf("storages[%d].options", [i]), sprintf("%d options", [count(want)]), sprintf("%d options", [count(s.options)]))]
	opt_v := [viol |
		count(want) == count(s.options)
		some j
		w := want[j]
		s.options[j] != w
		viol := violation("storages", sprintf("storages[%d].options[%d]", [i, j]), overlay_shown(w), overlay_shown(s.options[j]))]
	mp_v := [viol | not value_matches(po.mount_point, s.mount_point); viol := violation("storages", sprintf("storages[%d].mount_point", [i]), subst(po.mount_point), s.mount_point)]
	fs_v := [viol | po.fstype != s.fstype; viol := violation("storages", sprintf("storages[%d].fstype", [i]), po.fstype, s.fstype)]
	vs := array.concat(array.concat(count_v, opt_v), array.concat(mp_v, fs_v))
}

layer_options(ids, hashes) := [o |
	some j in numbers.range(0, count(ids) - 1)
	id := ids[j]
	h := hashes[j]
	o := concat("", ["io.katacontainers.fs-opt.layer=", base64.encode(concat("", [id, ",tar,ro,io.katacontainers.fs-opt.block_device=file,io.katacontainers.fs-opt.is-layer,io.katacontainers.fs-opt.root-hash=", h]))])
]

# Layer options are base64; show them decoded so a wrong root hash is readable.
overlay_shown(o) := concat("", ["io.katacontainers.fs-opt.layer=", base64.decode(trim_prefix(o, "io.katacontainers.fs-opt.layer="))]) {
	startswith(o, "io.katacontainers.fs-opt.layer=")
	base64.is_valid(trim_prefix(o, "io.katacontainers.fs-opt.layer="))
}

overlay_shown(o) := o {
	not startswith(o, "io.katacontainers.fs-opt.layer=")
}

overlay_shown(o) := o {
	startswith(o, "io.katacontainers.fs-opt.layer=")
	not base64.is_valid(trim_prefix(o, "io.katacontainers.fs-opt.layer="))
}

# Volumes and everything else: equal to one policy storage, the mount point maybe a pattern.
storage_check(p, i, s) := [] {
	not s.driver in {"blk", "overlayfs", "image_guest_pull"}
	any_other_storage_ok(p, s)
}

storage_check(p, i, s) := [violation("storages", sprintf("storages[%d] (%s)", [i, s.mount_point]), "a storage the policy lists", s)] {
	not s.driver in {"blk", "overlayfs", "image_guest_pull"}
	not any_other_storage_ok(p, s)
}

any_other_storage_ok(p, s) {
	some ps in p.storages
	other_storage_ok(ps, s)
}

other_storage_ok(ps, s) {
	ps.driver == s.driver
	ps.driver_options == s.driver_options
	ps.fstype == s.fstype
	ps.options == s.options
	ps.fs_group == s.fs_group
	value_matches(ps.mount_point, s.mount_point)
}

# --- linux

linux_violations(p) := vs {
	pl := p.OCI.Linux
	il := input.OCI.Linux
	ns := [viol | pl.Namespaces != il.Namespaces; viol := violation("linux", "OCI.Linux.Namespaces", pl.Namespaces, il.Namespaces)]
	masked := [viol |
		some path in object.get(pl, "MaskedPaths", [])
		not path in object.get(il, "MaskedPaths", [])
		viol := violation("linux", "OCI.Linux.MaskedPaths", path, "missing")]
	readonly := [viol |
		some path in object.get(pl, "ReadonlyPaths", [])
		not path in object.get(il, "ReadonlyPaths", [])
		not path in object.get(il, "MaskedPaths", [])
		viol := violation("linux", "OCI.Linux.ReadonlyPaths", path, "missing")]
	vs := array.concat(ns, array.concat(masked, readonly))
}

# ---------------------------------------------------------------------------------------------
# CreateSandboxRequest

CreateSandboxRequest {
	count(why_CreateSandboxRequest) == 0
}

why_CreateSandboxRequest := array.concat(
	array.concat(
		[viol | object.get(input, "guest_hook_path", "") != ""; viol := violation("sandbox", "guest_hook_path", "", input.guest_hook_path)],
		[viol | count(object.get(input, "kernel_modules", [])) > 0; viol := violation("sandbox", "kernel_modules", [], input.kernel_modules)],
	),
	array.concat(
		[viol | object.get(input, "sandbox_pidns", false) != false; viol := violation("sandbox", "sandbox_pidns", false, input.sandbox_pidns)],
		[viol |
			some i
		s := object.get(input, "storages", [])[i]
			not sandbox_storage_ok(s)
		viol := violation("sandbox", sprintf("storages[%d]", [i]), "a sandbox storage the policy lists", s)],
	),
)

# Equal on every field the policy lists; a field newer agents send (Storage.shared, 3.28) must
# keep its default unless the policy lists it.
sandbox_storage_ok(s) {
	some ps in policy_data.sandbox.storages
	every k, v in ps {
		object.get(s, k, null) == v
	}
	object.get(s, "shared", false) == object.get(ps, "shared", false)
}

# ---------------------------------------------------------------------------------------------
# ExecProcessRequest: only commands the policy lists (joined with spaces) or matches.

ExecProcessRequest {
	count(why_ExecProcessRequest) == 0
}

exec_command := concat(" ", input.process.Args)

exec_defaults := object.get(policy_data.request_defaults, "ExecProcessRequest", {})

allowed_exec := {c |
	some key in ["commands", "allowed_commands"]
	some cmd in object.get(exec_defaults, key, [])
	c := joined(cmd)
} | {c |
	some p in policy_data.containers
	some cmd in object.get(p, "exec_commands", [])
	c := joined(cmd)
}

joined(cmd) := cmd {
	is_string(cmd)
}

joined(cmd) := concat(" ", cmd) {
	is_array(cmd)
}

exec_ok {
	exec_command in allowed_exec
}

exec_ok {
	some r in object.get(exec_defaults, "regex", [])
	regex.match(r, exec_command)
}

why_ExecProcessRequest := [] {
	exec_ok
}

why_ExecProcessRequest := [violation("exec", "process.Args", sort([c | some c in allowed_exec]), exec_command)] {
	not exec_ok
}

# ---------------------------------------------------------------------------------------------
# CopyFileRequest: files the runtime copies into the shared directory of a container.

CopyFileRequest {
	count(why_CopyFileRequest) == 0
}

copy_patterns := [out |
	some r in object.get(policy_data.request_defaults, "CopyFileRequest", [])
	a := replace(r, "$(sfprefix)", policy_data.common.sfprefix)
	b := replace(a, "$(cpath)", policy_data.common.cpath)
	out := replace(b, "$(bundle-id)", "[a-z0-9]{64}")
]

copy_path_ok {
	some r in copy_patterns
	regex.match(r, input.path)
}

why_CopyFileRequest := array.concat(
	[viol | contains(input.path, "../"); viol := violation("copy_file", "path", "no ../ in the path", input.path)],
	array.concat(
		[viol | not copy_path_ok; viol := violation("copy_file", "path", copy_patterns, input.path)],
		[viol |
			src := object.get(input, "symlink_src", "")
			is_string(src)
			bad_symlink(src)
		viol := violation("copy_file", "symlink_src", "a relative path without ../", input.symlink_src)],
	),
)

bad_symlink(src) {
	startswith(src, "/")
}

bad_symlink(src) {
	contains(src, "../")
}
