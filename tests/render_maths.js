// Render TeX formulas with MathJax's node entry point; print the ones that fail, as JSON.
// Usage: node render_maths.js MATHJAX_PACKAGE_DIR < formulas.json  (a JSON list of
// {"tex": ..., "display": bool, "where": ...}); prints a JSON list of {"where", "tex", "error"}.
const path = require("path");
const mathjax = require(path.join(process.argv[2], "es5", "node-main.js"));

let input = "";
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", async () => {
  const formulas = JSON.parse(input);
  // Without noerrors/noundefined a TeX error is reported, not drawn in red as the site would.
  const MathJax = await mathjax.init({
    loader: { load: ["input/tex", "output/svg"] },
    tex: { packages: { "[-]": ["noerrors", "noundefined"] } },
  });
  const adaptor = MathJax.startup.adaptor;
  const failed = [];
  for (const f of formulas) {
    try {
      const html = adaptor.outerHTML(MathJax.tex2svg(f.tex, { display: f.display }));
      const error = html.match(/data-mjx-error="([^"]*)"/) || html.match(/merror/);
      if (error || !html.includes("<svg")) failed.push({ ...f, error: error ? error[1] : "no svg" });
    } catch (e) {
      failed.push({ ...f, error: String(e) });
    }
  }
  process.stdout.write(JSON.stringify(failed));
});
