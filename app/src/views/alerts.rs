//! Error messages, each in its own `role="alert"` element so screen readers announce it.

use leptos::prelude::*;

use crate::state::AppState;

#[component]
pub fn Alerts() -> impl IntoView {
    let state = expect_context::<AppState>();
    view! {
        <div class="alerts">
            <For
                each=move || state.alerts.get()
                key=|alert| alert.id
                children=move |alert| {
                    let id = alert.id;
                    view! {
                        <div class="alert" role="alert">
                            <span class="alert-message">{alert.message}</span>
                            <button
                                class="dismiss"
                                aria-label="Dismiss this message"
                                on:click=move |_| state.dismiss_alert(id)
                            >
                                "×"
                            </button>
                        </div>
                    }
                }
            />
        </div>
    }
}
