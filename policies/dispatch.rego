# Task dispatch: may this caller run this task on this agent, and in what sandbox?
#
# input:  {"subject": {"id", "roles"}, "task": {...envelope...}, "agent": {...registry entry...},
#          "request": {"method", "path", "remote_addr", "time"}}
# data:   data.agents (the registry by name) and data.config (policies/data.json)
# output: decision = {"allow": bool, "reasons": [string], "sandbox": {...}, "reuse": bool}
package gateway.dispatch

import rego.v1

cfg := data.config

roles := {r | some r in input.subject.roles}

# --- refusals -------------------------------------------------------------------------

deny contains "caller has no 'user' role" if not "user" in roles

deny contains msg if {
	not trusted_image
	msg := sprintf("image %q is not under a trusted prefix %v", [input.agent.image, cfg.trusted_image_prefixes])
}

deny contains msg if {
	some cap in input.agent.capabilities
	rule := cfg.restricted_capabilities[cap]
	count(roles & {r | some r in rule.roles}) == 0
	msg := sprintf("capability %q requires one of the roles %v", [cap, rule.roles])
}

deny contains "network 'egress' requires the 'egress' role" if {
	input.agent.network == "egress"
	not "egress" in roles
}

deny contains msg if {
	input.task.timeout_s > input.agent.timeout_s
	msg := sprintf("timeout_s %v exceeds the agent's limit of %v s", [input.task.timeout_s, input.agent.timeout_s])
}

trusted_image if {
	some prefix in cfg.trusted_image_prefixes
	startswith(input.agent.image, prefix)
}

# --- sandbox --------------------------------------------------------------------------

requested := input.agent.resources

# A restricted capability runs with its fixed sandbox whatever the agent asks for. An agent
# holds at most one (two would ask for two sandboxes: refused below), so this rule has one
# value whatever the input, which lets the compiled fast path answer it (DESIGN §4).
restricted_caps := [cap | some cap in input.agent.capabilities; cfg.restricted_capabilities[cap]]

restricted_sandbox := cfg.restricted_capabilities[restricted_caps[0]].sandbox if {
	count(restricted_caps) == 1
}

deny contains msg if {
	count(restricted_caps) > 1
	msg := sprintf("an agent may hold at most one restricted capability, not %v", [restricted_caps])
}

limits := restricted_sandbox if {
	restricted_sandbox
} else := {
	"memory_bytes": min([requested.memory_bytes, cfg.ceiling.memory_bytes]),
	"cpus": min([requested.cpus, cfg.ceiling.cpus]),
	"pids": min([requested.pids, cfg.ceiling.pids]),
}

# On Docker Swarm (input.backend "swarm") some guardrails exist only as an equivalent
# (gateway.containers.swarm); the sandbox names those this platform accepts (data.json:
# swarm.acceptable). An egress agent's host firewall is not among them: its tasks are
# refused on Swarm, not run unfenced.
sandbox := object.union(engine_sandbox, {"swarm_acceptable": cfg.swarm.acceptable}) if {
	input.backend == "swarm"
} else := engine_sandbox

engine_sandbox := {
	"network": network,
	"memory_bytes": limits.memory_bytes,
	"cpus": limits.cpus,
	"pids": limits.pids,
	"read_only_root": true,
	"mounts": [],
}

network := "egress" if {
	input.agent.network == "egress"
	"egress" in roles
} else := "internal"

# --- reuse ----------------------------------------------------------------------------

# Whether the task's (warm) container may serve further tasks of the same owner after this
# one (gateway.containers.pools). Off unless the registry entry asks for it and the agent
# is one whose tasks keep nothing a later task of the same caller must not see.
reusable_agents := {"echo"}

default reuse := false

reuse if {
	input.agent.reuse == true
	input.agent.name in reusable_agents
	not restricted_sandbox
}

# --- the answer -----------------------------------------------------------------------

default allow := false

allow if count(deny) == 0

decision := {"allow": true, "reasons": ["allowed"], "sandbox": sandbox, "reuse": reuse} if {
	allow
} else := {"allow": false, "reasons": deny}
