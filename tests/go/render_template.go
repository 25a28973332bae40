// Renders an Ollama TEMPLATE with Go's text/template, the engine Ollama runs, over the values Ollama passes
// (.System and .Messages). Reads {"template": ..., "cases": [{"system": ..., "messages": [...]}]} on stdin and
// writes the rendered strings as a JSON list. Used by tests/test_ollama.py.
package main

import (
	"encoding/json"
	"os"
	"strings"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Values struct {
	System   string    `json:"system"`
	Messages []Message `json:"messages"`
}

func main() {
	var in struct {
		Template string   `json:"template"`
		Cases    []Values `json:"cases"`
	}
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	tmpl := template.Must(template.New("t").Parse(in.Template))
	out := []string{}
	for _, c := range in.Cases {
		var b strings.Builder
		if err := tmpl.Execute(&b, c); err != nil {
			panic(err)
		}
		out = append(out, b.String())
	}
	json.NewEncoder(os.Stdout).Encode(out)
}
