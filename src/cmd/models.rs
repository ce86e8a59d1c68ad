//! `adi models`: the models your devices' OpenAI-compatible servers serve, as the hub's
//! OpenAI-compatible endpoint lists them (`GET /v1/models`), and the devices serving
//! each.

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::client::{HubClient, ListArgs};

/// The hub's `GET /v1/models`: OpenAI's list, each model with the devices serving it.
#[derive(Deserialize)]
struct ModelList {
    data: Vec<Model>,
}

/// One model; OpenAI's other fields (`object`, `created`, `owned_by`) are not shown.
#[derive(Deserialize, Serialize)]
struct Model {
    id: String,
    #[serde(default)]
    devices: Vec<ModelDevice>,
}

/// A device serving a model, and its server's service name there.
#[derive(Deserialize, Serialize)]
struct ModelDevice {
    id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    service: String,
}

impl ModelDevice {
    /// `name (id)/service`, or the id alone when the hub gives no name.
    fn shown(&self) -> String {
        let who = if self.name.is_empty() {
            self.id.clone()
        } else {
            format!("{} ({})", self.name, self.id)
        };
        if self.service.is_empty() {
            who
        } else {
            format!("{who}/{}", self.service)
        }
    }
}

pub async fn run(args: ListArgs) -> Result<()> {
    let client = HubClient::connect(&args.hub).await?;
    let list: ModelList = client
        .get("/v1/models")
        .await
        .context("asking the hub for its models (GET /v1/models)")?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&list.data)?);
        return Ok(());
    }
    if list.data.is_empty() {
        println!(
            "no models: run a device's agent with --openai NAME:PORT for an \
             OpenAI-compatible server (llama.cpp, vLLM, Ollama) on it"
        );
        return Ok(());
    }
    crate::table::print_table(["MODEL", "DEVICES"], &rows(list.data));
    Ok(())
}

fn rows(mut models: Vec<Model>) -> Vec<[String; 2]> {
    models.sort_by(|a, b| a.id.cmp(&b.id));
    models
        .into_iter()
        .map(|m| {
            let devices: Vec<String> = m.devices.iter().map(ModelDevice::shown).collect();
            let devices = if devices.is_empty() {
                "-".to_owned()
            } else {
                devices.join(", ")
            };
            [m.id, devices]
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_hubs_list_reads_into_model_and_device_rows() -> Result<()> {
        let list: ModelList = serde_json::from_str(
            r#"{"object":"list","data":[
                {"id":"qwen","object":"model","created":0,"owned_by":"adi","devices":[
                    {"id":"d1","name":"gpu-box","service":"llm"},
                    {"id":"d2","name":"","service":"vllm"}]},
                {"id":"llama","object":"model","created":0,"owned_by":"adi"}
            ]}"#,
        )?;
        assert_eq!(
            rows(list.data),
            [
                ["llama".to_owned(), "-".to_owned()],
                ["qwen".to_owned(), "gpu-box (d1)/llm, d2/vllm".to_owned()],
            ]
        );
        Ok(())
    }
}
