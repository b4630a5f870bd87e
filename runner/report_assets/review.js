// Review report behaviour: lazy thumbnails, status filters, keyboard navigation between flagged pages.
(function () {
  "use strict";
  var pages = Array.prototype.slice.call(document.querySelectorAll("section.page"));
  var onlyFlagged = document.getElementById("only-flagged");
  var chips = Array.prototype.slice.call(document.querySelectorAll(".chip[data-status]"));
  var counter = document.getElementById("shown-count");
  var activeStatus = null;
  var current = -1;

  // Thumbnails are data: URIs kept in data-src; decoding 1,000 of them up front stalls the tab.
  function show(img) {
    if (img.dataset.src) { img.src = img.dataset.src; img.removeAttribute("data-src"); }
  }
  var lazy = Array.prototype.slice.call(document.querySelectorAll("img[data-src]"));
  if ("IntersectionObserver" in window) {
    var io = new IntersectionObserver(function (entries) {
      entries.forEach(function (e) { if (e.isIntersecting) { show(e.target); io.unobserve(e.target); } });
    }, { rootMargin: "1200px 0px" });
    lazy.forEach(function (img) { io.observe(img); });
  } else {
    lazy.forEach(show);
  }

  function applyFilter() {
    var shown = 0;
    pages.forEach(function (p) {
      var visible = (!onlyFlagged.checked || p.dataset.flagged === "1") &&
                    (activeStatus === null || p.dataset.status === activeStatus);
      p.hidden = !visible;
      if (visible) { shown += 1; }
    });
    chips.forEach(function (c) { c.classList.toggle("active", c.dataset.status === activeStatus); });
    counter.textContent = String(shown);
  }
  onlyFlagged.addEventListener("change", applyFilter);
  chips.forEach(function (c) {
    c.addEventListener("click", function () {
      activeStatus = activeStatus === c.dataset.status ? null : c.dataset.status;
      applyFilter();
    });
  });

  function go(step) {
    var n = pages.length;
    for (var k = 1; k <= n; k++) {
      var i = current + step * k;
      if (i < 0 || i >= n) { break; }
      var p = pages[i];
      if (p.dataset.flagged === "1" && !p.hidden) {
        if (current >= 0) { pages[current].classList.remove("current"); }
        current = i;
        p.classList.add("current");
        p.querySelectorAll("img[data-src]").forEach(show);
        p.scrollIntoView({ block: "start" });
        if (history.replaceState) { history.replaceState(null, "", "#" + p.id); }
        return;
      }
    }
  }
  document.addEventListener("keydown", function (ev) {
    if (ev.ctrlKey || ev.metaKey || ev.altKey) { return; }
    var tag = ev.target && ev.target.tagName;
    if (tag === "INPUT" || tag === "SELECT" || tag === "TEXTAREA") { return; }
    if (ev.key === "j" || ev.key === "n") { go(1); ev.preventDefault(); }
    else if (ev.key === "k" || ev.key === "p") { go(-1); ev.preventDefault(); }
    else if (ev.key === "f") { onlyFlagged.checked = !onlyFlagged.checked; applyFilter(); ev.preventDefault(); }
  });
  applyFilter();
})();
