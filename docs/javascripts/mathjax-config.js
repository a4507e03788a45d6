// MathJax 3 configuration for pymdownx.arithmatex (generic mode). The renderer is vendored
// (docs/javascripts/vendor, Apache-2.0) so the site works offline and loads nothing from a CDN.
window.MathJax = {
  tex: { inlineMath: [["\\(", "\\)"]], displayMath: [["\\[", "\\]"]], processEscapes: true, processEnvironments: true },
  options: { ignoreHtmlClass: ".*|", processHtmlClass: "arithmatex", enableMenu: false },
  svg: { fontCache: "global" },
  startup: {
    ready: () => {
      MathJax.startup.defaultReady();
      if (window.document$) {
        window.document$.subscribe(() => MathJax.typesetPromise());
      }
    },
  },
};
