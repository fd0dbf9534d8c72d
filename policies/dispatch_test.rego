package gateway.dispatch_test

import rego.v1

import data.gateway.dispatch

echo_agent := {
	"name": "echo",
	"image": "agent-gateway/echo:dev",
	"capabilities": ["debug.echo"],
	"network": "internal",
	"timeout_s": 30,
	"resources": {"memory": "64m", "memory_bytes": 67108864, "cpus": 0.5, "pids": 32},
}

calc_agent := {
	"name": "calc",
	"image": "agent-gateway/calc:dev",
	"capabilities": ["code.eval"],
	"network": "internal",
	"timeout_s": 20,
	"resources": {"memory": "256m", "memory_bytes": 268435456, "cpus": 1, "pids": 128},
}

user := {"id": "alice", "roles": ["user"]}

developer := {"id": "dave", "roles": ["user", "developer"]}

task := {"capability": "debug.echo", "input": {}}

test_user_may_run_echo if {
	d := dispatch.decision with input as {"subject": user, "task": task, "agent": echo_agent}
	d.allow == true
	d.sandbox.network == "internal"
	d.sandbox.memory_bytes == 67108864
	d.sandbox.read_only_root == true
}

test_no_user_role_is_denied if {
	d := dispatch.decision with input as {"subject": {"id": "x", "roles": []}, "task": task, "agent": echo_agent}
	d.allow == false
	"caller has no 'user' role" in d.reasons
}

test_untrusted_image_is_denied if {
	agent := object.union(echo_agent, {"image": "evil.example/echo:latest"})
	d := dispatch.decision with input as {"subject": user, "task": task, "agent": agent}
	d.allow == false
	count(d.reasons) == 1
}

test_code_eval_needs_developer if {
	d := dispatch.decision with input as {"subject": user, "task": {"capability": "code.eval", "input": {}}, "agent": calc_agent}
	d.allow == false
	"capability \"code.eval\" requires one of the roles [\"developer\"]" in d.reasons
}

test_code_eval_gets_restricted_sandbox if {
	d := dispatch.decision with input as {"subject": developer, "task": {"capability": "code.eval", "input": {}}, "agent": calc_agent}
	d.allow == true
	d.sandbox.memory_bytes == 67108864
	d.sandbox.pids == 32
	d.sandbox.cpus == 0.5
}

test_resources_capped_by_ceiling if {
	big := object.union(echo_agent, {"resources": {"memory": "4g", "memory_bytes": 4294967296, "cpus": 8, "pids": 4096}})
	d := dispatch.decision with input as {"subject": user, "task": task, "agent": big}
	d.sandbox.memory_bytes == 536870912
	d.sandbox.cpus == 2
	d.sandbox.pids == 256
}

test_egress_needs_role if {
	agent := object.union(echo_agent, {"network": "egress"})
	denied := dispatch.decision with input as {"subject": user, "task": task, "agent": agent}
	denied.allow == false
	granted := dispatch.decision with input as {"subject": {"id": "e", "roles": ["user", "egress"]}, "task": task, "agent": agent}
	granted.allow == true
	granted.sandbox.network == "egress"
}

test_timeout_over_agent_limit_is_denied if {
	d := dispatch.decision with input as {"subject": user, "task": {"capability": "debug.echo", "input": {}, "timeout_s": 600}, "agent": echo_agent}
	d.allow == false
}

# --- reuse of a container for the same owner -------------------------------------------

test_reuse_is_off_by_default if {
	d := dispatch.decision with input as {"subject": user, "task": task, "agent": echo_agent}
	d.allow == true
	d.reuse == false
}

test_reuse_allowed_for_echo_when_the_registry_asks if {
	agent := object.union(echo_agent, {"reuse": true})
	d := dispatch.decision with input as {"subject": user, "task": task, "agent": agent}
	d.reuse == true
}

test_reuse_refused_for_other_agents_even_when_asked if {
	agent := object.union(calc_agent, {"reuse": true})
	d := dispatch.decision with input as {"subject": developer, "task": {"capability": "code.eval", "input": {}}, "agent": agent}
	d.allow == true
	d.reuse == false
}

test_reuse_refused_for_an_echo_impostor_with_a_restricted_capability if {
	agent := object.union(echo_agent, {"reuse": true, "capabilities": ["debug.probe"]})
	d := dispatch.decision with input as {"subject": developer, "task": task, "agent": agent}
	d.allow == true
	d.reuse == false
}

test_denied_decision_has_no_reuse if {
	agent := object.union(echo_agent, {"reuse": true})
	d := dispatch.decision with input as {"subject": {"id": "x", "roles": []}, "task": task, "agent": agent}
	d.allow == false
	not d.reuse
}

test_on_swarm_the_sandbox_accepts_the_listed_equivalents if {
	d := dispatch.decision with input as {"subject": user, "task": task, "agent": echo_agent, "backend": "swarm"}
	d.allow
	d.sandbox.swarm_acceptable == ["no-new-privileges", "memory-swap", "icc"]
	not "host-firewall" in d.sandbox.swarm_acceptable
}

test_on_the_local_engine_the_sandbox_accepts_no_equivalent if {
	d := dispatch.decision with input as {"subject": user, "task": task, "agent": echo_agent, "backend": "docker"}
	d.allow
	not d.sandbox.swarm_acceptable
}

test_an_agent_with_two_restricted_capabilities_is_refused if {
	two := object.union(calc_agent, {"capabilities": ["code.eval", "debug.probe"]})
	d := dispatch.decision with input as {"subject": developer, "task": {"capability": "code.eval", "input": {}}, "agent": two}
	not d.allow
	some reason in d.reasons
	contains(reason, "at most one restricted capability")
}
