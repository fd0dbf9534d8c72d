package gateway.messages_test

import rego.v1

import data.gateway.messages

wordstats := {"name": "wordstats", "capabilities": ["text.stats"], "subscriptions": []}

echo := {"name": "echo", "capabilities": ["debug.echo"], "subscriptions": []}

calc := {"name": "calc", "capabilities": ["code.eval"], "subscriptions": []}

coordinator := {
	"spiffe_id": "spiffe://agent-gateway.local/agent/coordinator",
	"trust_domain": "agent-gateway.local",
	"agent": "coordinator",
	"instance_id": "i1",
	"task_id": "t1",
	"local": true,
	"depth": 0,
	"lineage": [],
}

probe := object.union(coordinator, {"spiffe_id": "spiffe://agent-gateway.local/agent/probe", "agent": "probe"})

# wordstats running a task coordinator delegated (t1 -> t2)
child := object.union(coordinator, {
	"spiffe_id": "spiffe://agent-gateway.local/agent/wordstats",
	"agent": "wordstats",
	"task_id": "t2",
	"depth": 1,
	"lineage": [{"task_id": "t1", "agent": "coordinator"}],
})

external := {
	"spiffe_id": "spiffe://partner.example/agent/coordinator",
	"trust_domain": "partner.example",
	"agent": "coordinator",
	"instance_id": null,
	"task_id": null,
	"local": false,
	"depth": 0,
	"lineage": [],
}

to_agent(agent) := {"type": "agent", "agent": agent}

request(to, kind) := {"type": "request", "to": to, "kind": kind, "payload": {}}

delegate(to) := {"type": "delegate", "to": to, "kind": "task.delegate", "payload": {"input": {}}}

event(topic, kind) := {"type": "event", "topic": topic, "kind": kind, "payload": {"text": "hi"}}

decide(source, message, target) := d if {
	d := messages.decision with input as {"source": source, "message": message, "target": target}
}

test_coordinator_may_request_wordstats if {
	d := decide(coordinator, request("wordstats", "text.stats"), to_agent(wordstats))
	d.allow == true
	d.reasons == ["allowed"]
}

test_coordinator_may_delegate_to_wordstats if {
	decide(coordinator, delegate("wordstats"), to_agent(wordstats)).allow == true
}

test_unlisted_route_is_denied_with_a_reason if {
	d := decide(child, request("coordinator", "ping"), to_agent({"name": "coordinator"}))
	d.allow == false
	d.reasons == {"agent \"wordstats\" may not send request messages of kind \"ping\" to \"coordinator\""}
}

test_anyone_may_ping_echo_but_only_with_listed_kinds if {
	decide(child, request("echo", "ping"), to_agent(echo)).allow == true
	decide(child, request("echo", "text.stats"), to_agent(echo)).allow == false
}

test_broadcast_reaches_only_allowed_recipients if {
	b := {"type": "broadcast", "kind": "notice", "payload": {"text": "x"}}
	decide(child, b, to_agent(echo)).allow == true
	decide(child, b, to_agent(wordstats)).allow == false
}

test_protected_agent_takes_no_messages_even_from_probe if {
	d := decide(probe, request("calc", "ping"), to_agent(calc))
	d.allow == false
	"agent \"calc\" only takes tasks, not messages" in d.reasons
}

test_probe_may_delegate_to_protected_agent_dispatch_policy_decides if {
	decide(probe, delegate("calc"), to_agent(calc)).allow == true
}

test_topic_publishers_and_kinds if {
	topic := {"type": "topic", "topic": "notices", "subscribers": ["probe"]}
	decide(child, event("notices", "notice"), topic).allow == true
	decide(child, event("notices", "ping"), topic).allow == false
}

test_restricted_topic if {
	topic := {"type": "topic", "topic": "documents", "subscribers": []}
	decide(coordinator, event("documents", "notice"), topic).allow == true
	d := decide(child, event("documents", "notice"), topic)
	d.reasons == {"agent \"wordstats\" may not publish \"notice\" events to topic \"documents\""}
}

test_unconfigured_topic_is_denied if {
	topic := {"type": "topic", "topic": "secret", "subscribers": ["x"]}
	decide(coordinator, event("secret", "notice"), topic).allow == false
}

test_external_sender_needs_to_be_listed if {
	d := decide(external, request("wordstats", "text.stats"), to_agent(wordstats))
	d.allow == false
	d.reasons == {"sender \"spiffe://partner.example/agent/coordinator\" is neither a container of this hub nor a trusted external sender"}
	ok := messages.decision with input as {"source": external, "message": request("wordstats", "text.stats"), "target": to_agent(wordstats)}
		with data.config.messages.external_senders as ["spiffe://partner.example/agent/coordinator"]
	ok.allow == true
}

test_external_sender_cannot_delegate if {
	d := messages.decision with input as {"source": external, "message": delegate("wordstats"), "target": to_agent(wordstats)}
		with data.config.messages.external_senders as ["spiffe://partner.example/agent/coordinator"]
	d.reasons == {"only an agent running a task may delegate"}
}

test_task_id_must_be_in_the_lineage if {
	about_parent := object.union(request("echo", "ping"), {"task_id": "t1"})
	decide(child, about_parent, to_agent(echo)).allow == true
	about_own := object.union(request("echo", "ping"), {"task_id": "t2"})
	decide(child, about_own, to_agent(echo)).allow == true
	about_other := object.union(request("echo", "ping"), {"task_id": "t9"})
	d := decide(child, about_other, to_agent(echo))
	d.reasons == {"task \"t9\" is not in the sender's task lineage"}
}

test_no_delegation_back_up_the_lineage if {
	d := decide(child, delegate("coordinator"), to_agent({"name": "coordinator"}))
	"delegating to \"coordinator\" would form a cycle in the task lineage" in d.reasons
}

test_no_delegation_to_self if {
	d := decide(probe, delegate("probe"), to_agent({"name": "probe"}))
	d.allow == false
	d.reasons == {"delegating to \"probe\" would form a cycle in the task lineage"}
}

test_undefined_input_is_denied if {
	d := messages.decision with input as {}
	d.allow == false
	d.reasons == ["the message matches no allowed scope"]
}

test_target_of_unknown_type_is_denied if {
	d := decide(coordinator, request("wordstats", "text.stats"), {"type": "planet", "agent": wordstats})
	d.allow == false
}

# --- tenancy ----------------------------------------------------------------------------

alices_coordinator := object.union(coordinator, {"owner": "alice"})

alices_child := object.union(child, {"owner": "alice"})

wordstats_of(owner, id) := {"instance_id": id, "agent": "wordstats", "task_id": concat("-", ["t", id]), "owner": owner, "lineage": []}

echo_of(owner, id) := {"instance_id": id, "agent": "echo", "task_id": concat("-", ["t", id]), "owner": owner, "lineage": []}

test_a_request_reaches_only_instances_of_the_same_owner if {
	target := object.union(to_agent(wordstats), {"instances": [wordstats_of("alice", "w1"), wordstats_of("bob", "w2")]})
	d := decide(alices_coordinator, request("wordstats", "text.stats"), target)
	d.allow == true
	d.deliver_to == {"w1"}
}

test_a_request_to_another_owners_only_instance_reaches_nobody if {
	target := object.union(to_agent(wordstats), {"instances": [wordstats_of("bob", "w2")]})
	d := decide(alices_coordinator, request("wordstats", "text.stats"), target)
	count(d.deliver_to) == 0
}

test_an_event_reaches_only_the_senders_owner if {
	target := {"type": "topic", "topic": "notices", "subscribers": ["echo"], "instances": [echo_of("alice", "e1"), echo_of("bob", "e2"), echo_of("carol", "e3")]}
	d := decide(alices_child, event("notices", "notice"), target)
	d.allow == true
	d.deliver_to == {"e1"}
}

test_a_sender_without_an_owner_reaches_no_instance if {
	target := object.union(to_agent(echo), {"instances": [echo_of("alice", "e1")]})
	d := decide(object.union(external, {"owner": null}), request("echo", "ping"), target)
	count(object.get(d, "deliver_to", set())) == 0
}

test_a_cross_owner_rule_opens_exactly_its_route if {
	rules := [{"from": ["coordinator"], "to": ["wordstats"], "types": ["request"]}]
	target := object.union(to_agent(wordstats), {"instances": [wordstats_of("bob", "w2")]})
	d := messages.decision with input as {"source": alices_coordinator, "message": request("wordstats", "text.stats"), "target": target}
		with data.config.messages.cross_owner as rules
	d.deliver_to == {"w2"}
	e := messages.decision with input as {"source": alices_coordinator, "message": {"type": "broadcast", "kind": "notice", "payload": {}}, "target": target}
		with data.config.messages.cross_owner as rules
	count(object.get(e, "deliver_to", set())) == 0
}

# --- tools an agent calls at /mcp (type "tool") ----------------------------------------------

files := {"name": "files", "protocol": "mcp", "capabilities": [], "subscriptions": []}

tool_call(to, tool) := {"type": "tool", "to": to, "kind": "mcp.tools/call", "tool": tool, "arguments": {"text": "hi"}}

test_probe_may_call_echos_tool if {
	d := decide(probe, tool_call("echo", "echo.debug.echo"), to_agent(echo))
	d.allow == true
}

test_probe_may_call_an_mcp_servers_tool if {
	d := decide(probe, tool_call("files", "files.read"), to_agent(files))
	d.allow == true
}

test_a_tool_call_needs_a_tool_route if {
	d := decide(coordinator, tool_call("echo", "echo.debug.echo"), to_agent(echo))
	d.allow == false
	some reason in d.reasons
	contains(reason, "may not send tool messages")
}

test_a_request_route_does_not_allow_tools if {
	# probe may request and delegate to anyone, but call tools of echo and files only
	d := decide(probe, tool_call("wordstats", "wordstats.text.stats"), to_agent(wordstats))
	d.allow == false
}

test_a_route_can_name_its_tools if {
	routes := [{"from": ["probe"], "to": ["echo"], "types": ["tool"], "tools": ["echo.other"]}]
	d := messages.decision with input as {"source": probe, "message": tool_call("echo", "echo.debug.echo"), "target": to_agent(echo)}
		with data.config.messages.routes as routes
	d.allow == false
}

test_an_external_sender_may_not_call_tools if {
	d := messages.decision with input as {"source": external, "message": tool_call("echo", "echo.debug.echo"), "target": to_agent(echo)}
		with data.config.messages.external_senders as [external.spiffe_id]
		with data.config.messages.routes as [{"from": ["*"], "to": ["*"], "types": ["tool"]}]
	d.allow == false
	"only an agent running a task may call tools" in d.reasons
}

test_a_protected_agent_is_callable_as_a_tool if {
	d := messages.decision with input as {"source": probe, "message": tool_call("calc", "calc.code.eval"), "target": to_agent(calc)}
		with data.config.messages.routes as [{"from": ["probe"], "to": ["calc"], "types": ["tool"]}]
	d.allow == true
}

test_a_tool_call_back_up_the_lineage_is_a_cycle if {
	d := messages.decision with input as {"source": child, "message": tool_call("coordinator", "coordinator.x"), "target": to_agent({"name": "coordinator", "capabilities": []})}
		with data.config.messages.routes as [{"from": ["*"], "to": ["*"], "types": ["tool"]}]
	d.allow == false
}
