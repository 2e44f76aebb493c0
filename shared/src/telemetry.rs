//! Logs and traces: `tracing` with JSON (or pretty, on a terminal) logs, an OpenTelemetry layer that exports over
//! OTLP/HTTP when an endpoint is configured, and W3C trace context carried in NATS headers from ingest to applier.

use std::io::IsTerminal;

use anyhow::Context as _;
use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer};

use crate::settings::{LogFormat, TelemetrySettings};

/// Keeps the trace pipeline alive; dropping it flushes spans not yet exported.
#[derive(Debug)]
pub struct TelemetryGuard {
    provider: SdkTracerProvider,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Err(err) = self.provider.shutdown() {
            eprintln!("flushing traces failed: {err}");
        }
    }
}

/// Installs the global subscriber. Spans always carry OpenTelemetry context (so trace ids cross NATS even when
/// nothing is exported); they are exported only when `otlp_endpoint` is set.
pub fn init(settings: &TelemetrySettings, default_service: &str) -> anyhow::Result<TelemetryGuard> {
    let service = settings
        .service_name
        .clone()
        .unwrap_or_else(|| default_service.to_owned());
    let mut builder = SdkTracerProvider::builder().with_resource(
        Resource::builder_empty()
            .with_service_name(service.clone())
            .build(),
    );
    if let Some(endpoint) = settings.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_endpoint(format!("{}/v1/traces", endpoint.trim_end_matches('/')))
            .build()
            .context("building the OTLP span exporter")?;
        builder = builder.with_batch_exporter(exporter);
    }
    let provider = builder.build();
    // Trace context must exist whatever the log filter says (it crosses NATS to the applier), so the OpenTelemetry
    // layer has its own filter: our crates' spans at INFO and above.
    let otel_filter = Targets::new()
        .with_target("stripe_sync_ingest", LevelFilter::INFO)
        .with_target("stripe_sync_applier", LevelFilter::INFO)
        .with_target("stripe_sync_shared", LevelFilter::INFO);
    let otel_layer = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer(service))
        .with_filter(otel_filter);

    let filter = EnvFilter::try_new(&settings.filter)
        .with_context(|| format!("invalid log filter {:?}", settings.filter))?;
    let json = match settings.format {
        LogFormat::Json => true,
        LogFormat::Pretty => false,
        LogFormat::Auto => !std::io::stdout().is_terminal(),
    };
    let fmt_layer = if json {
        tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .boxed()
    } else {
        tracing_subscriber::fmt::layer().compact().boxed()
    };
    tracing_subscriber::registry()
        .with(fmt_layer.with_filter(filter))
        .with(otel_layer)
        .try_init()
        .context("installing the tracing subscriber")?;
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    Ok(TelemetryGuard { provider })
}

struct HeaderInjector<'a>(&'a mut HeaderMap);

impl Injector for HeaderInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

struct HeaderExtractor<'a>(&'a HeaderMap);

impl Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|v| v.as_str())
    }
    fn keys(&self) -> Vec<&str> {
        self.0.iter().map(|(k, _)| k.as_ref()).collect()
    }
}

/// Writes the span's trace context (`traceparent`, `tracestate`) into NATS headers.
pub fn inject_trace_context(span: &tracing::Span, headers: &mut HeaderMap) {
    TraceContextPropagator::new().inject_context(&span.context(), &mut HeaderInjector(headers));
}

/// Makes the span a child of the trace context found in NATS headers, if any.
pub fn continue_trace(span: &tracing::Span, headers: Option<&HeaderMap>) {
    if let Some(headers) = headers {
        let parent = TraceContextPropagator::new().extract(&HeaderExtractor(headers));
        // Fails only when the span is disabled; then there is nothing to link.
        let _ = span.set_parent(parent);
    }
}
