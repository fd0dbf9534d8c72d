# Agent-to-agent messages: may this sender send this message to this target?
#
# The hub verifies the sender's JWT-SVID before asking, and passes only what it verified.
# input:  {"source":  {"spiffe_id", "trust_domain", "agent", "instance_id", "task_id",
#                      "local": bool (a container of this hub), "depth",
#                      "lineage": [{"task_id", "agent"}] (ancestors, the user's task first)},
#          "message": {...envelope: type, to?, topic?, kind, payload, task_id?...}
#                   | {"type": "tool", "to", "kind": "mcp.tools/call", "tool", "arguments"?}
#                     (an agent's MCP tools/call at /mcp; no "arguments": a tools/list probe),
#          "target":  {"type": "agent", "agent": {...registry entry...}, "instances": [...]}
#                   | {"type": "topic", "topic", "subscribers": [agent names], "instances": [...]}}
#          where each of "instances" (the running containers that could receive it) is
#          {"instance_id", "agent", "task_id", "owner", "lineage": [{"task_id", "agent"}]}
#          and input.source also carries "owner" (the subject that owns the sender's task)
# data:   data.agents (the registry) and data.config.messages (policies/data.json)
# output: decision = {"allow": bool, "reasons": [string],
#                     "deliver_to": [instance ids]  (only these receive it; absent = none)}
package gateway.messages

import rego.v1

cfg := data.config.messages

sender := input.source.agent

msg_type := input.message.type

kind := input.message.kind

# --- who is sending -------------------------------------------------------------------

known_sender if input.source.local == true

known_sender if input.source.spiffe_id in cfg.external_senders

deny contains msg if {
	not known_sender
	msg := sprintf("sender %q is neither a container of this hub nor a trusted external sender", [input.source.spiffe_id])
}

deny contains "only an agent running a task may delegate" if {
	msg_type == "delegate"
	not input.source.local == true
}

deny contains "only an agent running a task may call tools" if {
	msg_type == "tool"
	not input.source.local == true
}

# Types that start work on the target (a child task, or a tool run for the sender's owner).
work_types := {"delegate", "tool"}

# --- to an agent: request, broadcast (one decision per recipient), delegate ------------

deny contains msg if {
	input.target.type == "agent"
	not route_allowed
	msg := sprintf("agent %q may not send %s messages of kind %q to %q", [sender, msg_type, kind, input.target.agent.name])
}

deny contains msg if {
	input.target.type == "agent"
	not msg_type in work_types
	input.target.agent.name in cfg.protected_agents
	msg := sprintf("agent %q only takes tasks, not messages", [input.target.agent.name])
}

route_allowed if {
	some rule in cfg.routes
	matches(rule.from, sender)
	matches(rule.to, input.target.agent.name)
	matches(rule.types, msg_type)
	matches(object.get(rule, "kinds", ["*"]), kind)
	tool_matches(rule)
}

# A route may name the tools it allows ("tools": [hub tool names]; absent = all).
tool_matches(_) if msg_type != "tool"

tool_matches(rule) if {
	msg_type == "tool"
	matches(object.get(rule, "tools", ["*"]), input.message.tool)
}

# --- to a topic: events ---------------------------------------------------------------

deny contains msg if {
	input.target.type == "topic"
	not publisher
	msg := sprintf("agent %q may not publish %q events to topic %q", [sender, kind, input.target.topic])
}

publisher if {
	rule := cfg.topics[input.target.topic]
	matches(rule.publishers, sender)
	matches(object.get(rule, "kinds", ["*"]), kind)
}

# --- task lineage ---------------------------------------------------------------------

lineage_tasks contains t.task_id if some t in input.source.lineage

lineage_tasks contains input.source.task_id if input.source.task_id

lineage_agents contains t.agent if some t in input.source.lineage

lineage_agents contains sender if msg_type in work_types

# A message may speak for the sender's own task or an ancestor of it, nothing else.
deny contains msg if {
	input.message.task_id
	not input.message.task_id in lineage_tasks
	msg := sprintf("task %q is not in the sender's task lineage", [input.message.task_id])
}

# No delegation cycles: an agent already in the lineage cannot be delegated to again.
deny contains msg if {
	msg_type in work_types
	input.target.agent.name in lineage_agents
	msg := sprintf("delegating to %q would form a cycle in the task lineage", [input.target.agent.name])
}

# --- helpers and the answer -----------------------------------------------------------

matches(patterns, _) if "*" in patterns

matches(patterns, value) if value in patterns

# Allowed only with a positive match for the sender and the target and no objection, so a
# missing or malformed input field can never allow by leaving a deny rule undefined.
default allow := false

allow if {
	known_sender
	target_allowed
	count(deny) == 0
}

target_allowed if {
	input.target.type == "agent"
	route_allowed
}

target_allowed if {
	input.target.type == "topic"
	publisher
}

# --- tenancy: which running instances it may reach --------------------------------------

# An instance whose task belongs to the sender's owner (the user who submitted the root task).
may_reach(inst) if {
	input.source.owner
	inst.owner == input.source.owner
}

# Anything else only where a cross-owner rule of data.config.messages says so.
may_reach(inst) if {
	some rule in object.get(cfg, "cross_owner", [])
	matches(rule.from, sender)
	matches(rule.to, inst.agent)
	matches(rule.types, msg_type)
}

deliver_to contains inst.instance_id if {
	some inst in object.get(input.target, "instances", [])
	may_reach(inst)
}

decision := {"allow": true, "reasons": ["allowed"], "deliver_to": deliver_to} if {
	allow
} else := {"allow": false, "reasons": deny} if {
	count(deny) > 0
} else := {"allow": false, "reasons": ["the message matches no allowed scope"]}
