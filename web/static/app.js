// The user page: the diversity control, like / rate buttons and the title search.
// Every change asks the service again through the page's own endpoints and swaps the list in;
// the server marks what moved against the ids shown before (new, up, down).
(function () {
  const section = document.getElementById("user");
  if (!section) return;
  const userId = section.dataset.userId;
  const k = section.dataset.k;
  const answer = document.getElementById("answer");
  const banner = document.getElementById("banner");
  const status = document.getElementById("status");
  const slider = document.getElementById("diversity");
  const shown = document.getElementById("diversity-value");
  let pending = 0;

  function showError(html) { banner.innerHTML = html; }

  async function refresh() {
    const ticket = ++pending;
    const prev = Array.from(answer.querySelectorAll(".card")).map((c) => c.dataset.itemId);
    const params = new URLSearchParams({ k: k, diversity: slider.value, prev: prev.join(",") });
    if (section.dataset.new) params.set("new", "1");
    const reply = await fetch(`/user/${userId}/cards?${params}`, { headers: { "X-Fragment": "1" } });
    const html = await reply.text();
    if (ticket !== pending) return;  // a newer refresh is on its way
    if (!reply.ok) { showError(html); return; }
    banner.innerHTML = "";
    answer.innerHTML = html;
    section.dataset.refreshed = String(Number(section.dataset.refreshed || 0) + 1);
  }

  async function rate(itemId, rating) {
    status.textContent = "logging…";
    const reply = await fetch(`/api/users/${userId}/ratings`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ item_id: Number(itemId), rating: Number(rating) }),
    });
    const body = await reply.json().catch(() => ({ error: "no answer" }));
    if (!reply.ok) {
      status.textContent = "";
      const cls = reply.status === 503 ? "banner-down" : "banner-error";
      showError(`<div class="banner ${cls}" data-status="${reply.status}"></div>`);
      banner.firstChild.textContent = body.error;
      return;
    }
    status.textContent = `Logged ${body.rating}★ for ${body.title}; asking for the list again.`;
    await refresh();
  }

  slider.addEventListener("input", () => { shown.textContent = Number(slider.value).toFixed(2); });
  slider.addEventListener("change", refresh);
  document.addEventListener("click", (event) => {
    const button = event.target.closest("button[data-rate]");
    if (button) rate(button.dataset.item, button.dataset.rate);
  });
  document.getElementById("search").addEventListener("submit", async (event) => {
    event.preventDefault();
    const q = document.getElementById("q").value;
    const reply = await fetch(`/user/${userId}/search?q=${encodeURIComponent(q)}`,
                              { headers: { "X-Fragment": "1" } });
    const html = await reply.text();
    if (!reply.ok) { showError(html); return; }
    document.getElementById("search-results").innerHTML = html;
  });
})();
