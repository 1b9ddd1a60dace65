using System.Text.Json;
using QcowTier.Tests.Infrastructure;

namespace QcowTier.Tests.Cli;

/// <summary>The tier, heat and rebalance verbs and --record-heat, end to end through the tool.</summary>
public sealed class TieringCliTests : IDisposable
{
    private readonly TempDir _dir = new();

    public void Dispose() => _dir.Dispose();

    [Fact]
    public void Create_with_tier_options_spills_over_the_budget_and_map_names_the_tiers()
    {
        var img = _dir.File("t.qcow2");
        CliHarness.Run("create", "-f", "qcow2", "-o", "tier_data_file=t.hdd,ssd_budget=1M", img, "16M").ExitCode.Should().Be(0);
        File.Exists(_dir.File("t.hdd")).Should().BeTrue();
        CliHarness.Run("io", "-c", "write -P 0x5a 0 4M", img).ExitCode.Should().Be(0);

        var map = JsonDocument.Parse(CliHarness.Run("map", "--output=json", img).StdOut).RootElement;
        var tiers = map.EnumerateArray().Where(e => e.GetProperty("data").GetBoolean())
            .GroupBy(e => e.GetProperty("tier").GetString()).ToDictionary(g => g.Key!, g => g.Sum(e => e.GetProperty("length").GetInt64()));
        tiers["ssd"].Should().Be(1L << 20);
        tiers["hdd"].Should().Be(3L << 20);

        var status = JsonDocument.Parse(CliHarness.Run("tier", "status", "--output=json", img).StdOut).RootElement;
        status.GetProperty("ssd-bytes").GetInt64().Should().Be(1L << 20);
        status.GetProperty("hdd-bytes").GetInt64().Should().Be(3L << 20);

        var info = CliHarness.Run("info", img);
        info.StdOut.Should().Contain("hdd bytes: 3145728");

        // QEMU refuses the tiered image by name; our check is clean; our reads see the pattern.
        Qemu.Img("info", img).StdErr.Should().Contain("Unsupported qcow2 feature(s): QcowTier tiered layout");
        CliHarness.Run("check", img).ExitCode.Should().Be(0);
        CliHarness.Run("io", "-c", "read -P 0x5a 0 4M", img).ExitCode.Should().Be(0);
    }

    [Fact]
    public void Move_pin_export_and_detach_hand_the_image_back_to_qemu()
    {
        var img = _dir.File("m.qcow2");
        CliHarness.Run("create", "-f", "qcow2", "-o", "tier_data_file=m.hdd,tier_default=hdd", img, "8M").ExitCode.Should().Be(0);
        CliHarness.Run("io", "-c", "write -P 0x11 0 2M", "-c", "write -P 0x22 4M 1M", img).ExitCode.Should().Be(0);
        CliHarness.Run("tier", "move", "--to", "ssd", img, "0", "1M").StdOut.Should().Contain("Moved 16 clusters");
        CliHarness.Run("tier", "pin", img, "6M", "1M", "ssd").ExitCode.Should().Be(0);
        var status = JsonDocument.Parse(CliHarness.Run("tier", "status", "--output=json", img).StdOut).RootElement;
        status.GetProperty("ssd-bytes").GetInt64().Should().Be(1L << 20);
        status.GetProperty("pins").GetArrayLength().Should().Be(1);

        var plain = _dir.File("plain.qcow2");
        var raw = _dir.File("plain.raw");
        CliHarness.Run("tier", "export", img, plain).ExitCode.Should().Be(0);
        CliHarness.Run("tier", "export", "-O", "raw", img, raw).ExitCode.Should().Be(0);
        Qemu.AssertClean(plain);
        Qemu.AssertSameContent(plain, raw, "qcow2", "raw");

        CliHarness.Run("tier", "detach", img).ExitCode.Should().Be(0);
        File.Exists(_dir.File("m.hdd")).Should().BeFalse();
        Qemu.AssertClean(img);
        Qemu.AssertSameContent(img, plain);
        Qemu.Io("-c", "read -P 0x22 4M 1M", img).StdOut.Should().NotContain("Pattern verification failed");
    }

    [Fact]
    public void Attach_turns_a_qemu_image_into_a_tiered_one()
    {
        var img = _dir.File("q.qcow2");
        Qemu.Img("create", "-f", "qcow2", img, "8M").EnsureSuccess();
        Qemu.Io("-c", "write -P 0x33 0 3M", img).EnsureSuccess();
        CliHarness.Run("tier", "attach", "--default-tier", "hdd", img, "q.hdd").ExitCode.Should().Be(0);
        CliHarness.Run("tier", "move", "--to", "hdd", img, "0", "2M").ExitCode.Should().Be(0);
        CliHarness.Run("io", "-c", "read -P 0x33 0 3M", img).ExitCode.Should().Be(0);
        CliHarness.Run("tier", "detach", img).ExitCode.Should().Be(0);
        Qemu.AssertClean(img);
        Qemu.Io("-c", "read -P 0x33 0 3M", img).StdOut.Should().NotContain("Pattern verification failed");
    }

    [Fact]
    public void Record_heat_then_show_report_render_and_rebalance()
    {
        var img = _dir.File("h.qcow2");
        var heat = _dir.File("h.heat");
        CliHarness.Run("create", "-f", "qcow2", "-o", "tier_data_file=h.hdd,tier_default=hdd", img, "16M").ExitCode.Should().Be(0);
        CliHarness.Run("io", "-c", "write -P 0x44 0 16M", img).ExitCode.Should().Be(0);
        // A hot 1 MiB at 2M, read many times; a little everywhere else.
        var commands = new List<string> { "io", "--record-heat", heat };
        for (var i = 0; i < 40; i++)
        {
            commands.AddRange(["-c", "read 2M 1M"]);
        }
        commands.AddRange(["-c", "read 0 16M", img]);
        CliHarness.Run([.. commands]).ExitCode.Should().Be(0);

        var show = JsonDocument.Parse(CliHarness.Run("heat", "show", "--top", "3", "--output=json", heat).StdOut).RootElement;
        show.GetArrayLength().Should().Be(3);
        var hottest = show[0];
        hottest.GetProperty("start").GetInt64().Should().BeInRange(2L << 20, (3L << 20) - 1);
        hottest.GetProperty("reads").GetInt64().Should().Be(41);
        hottest.GetProperty("writes").GetInt64().Should().Be(0);
        hottest.GetProperty("score").GetDouble().Should().Be(41);

        CliHarness.Run("heat", "report", heat).StdOut.Should().Contain("hottest");
        var png = _dir.File("h.png");
        CliHarness.Run("heat", "render", "--image", img, "-o", png, heat).ExitCode.Should().Be(0);
        File.ReadAllBytes(png).AsSpan(0, 8).ToArray().Should().Equal(0x89, (byte)'P', (byte)'N', (byte)'G', 0x0d, 0x0a, 0x1a, 0x0a);

        var plan = JsonDocument.Parse(CliHarness.Run("rebalance", "plan", img, "--heat", heat, "--ssd-budget", "10%", "--output=json").StdOut).RootElement;
        plan.GetProperty("worth-acting").GetBoolean().Should().BeTrue();
        // The hot megabyte, then (free budget, nothing displaced) clusters read once, up to 10 % of 16 MiB.
        plan.GetProperty("bytes-to-ssd").GetInt64().Should().BeInRange(1L << 20, (16L << 20) / 10);

        var picture = _dir.File("rb");
        CliHarness.Run("rebalance", "apply", img, "--heat", heat, "--ssd-budget", "10%", "--picture", picture,
            "--sequential-run", "8M", "--hdd-model", "10ms,120M").ExitCode.Should().Be(0);
        File.ReadAllBytes(picture + "-0.png").AsSpan(1, 3).ToArray().Should().Equal((byte)'P', (byte)'N', (byte)'G');
        CliHarness.Run("rebalance", "plan", img, "--heat", heat, "--ssd-budget", "10%", "--hdd-model", "10").ExitCode.Should().NotBe(0);
        var status = JsonDocument.Parse(CliHarness.Run("tier", "status", "--output=json", img).StdOut).RootElement;
        status.GetProperty("ssd-bytes").GetInt64().Should().BeInRange(1L << 20, (16L << 20) / 10);
        var hot = JsonDocument.Parse(CliHarness.Run("map", "--output=json", "--start-offset=2M", "--max-length=1M", img).StdOut).RootElement;
        hot.EnumerateArray().Should().OnlyContain(e => e.GetProperty("tier").GetString() == "ssd");
        var again = JsonDocument.Parse(CliHarness.Run("rebalance", "plan", img, "--heat", heat, "--ssd-budget", "10%", "--output=json").StdOut).RootElement;
        again.GetProperty("moves").GetArrayLength().Should().Be(0);
        CliHarness.Run("io", "-c", "read -P 0x44 0 16M", img).ExitCode.Should().Be(0);
        CliHarness.Run("check", img).ExitCode.Should().Be(0);
    }

    [Fact]
    public void A_heat_map_of_another_image_is_refused_with_one_line()
    {
        var a = _dir.File("a.qcow2");
        var b = _dir.File("b.qcow2");
        CliHarness.Run("create", "-f", "qcow2", "-o", "tier_data_file=a.hdd", a, "4M").ExitCode.Should().Be(0);
        CliHarness.Run("create", "-f", "qcow2", "-o", "tier_data_file=b.hdd", b, "4M").ExitCode.Should().Be(0);
        var heat = _dir.File("a.heat");
        CliHarness.Run("io", "--record-heat", heat, "-c", "write 0 64k", a).ExitCode.Should().Be(0);
        var r = CliHarness.Run("rebalance", "plan", b, "--heat", heat, "--ssd-budget", "1M");
        r.ShouldBeOneLineError("belongs to image");
    }
}
